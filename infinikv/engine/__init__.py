"""Decoding: sampling, detokenization with stop strings, and the generation loop."""

from infinikv.engine.generator import Generation, GenerationEvent, Generator
from infinikv.engine.sampling import SamplingParams

__all__ = ["Generation", "GenerationEvent", "Generator", "SamplingParams"]
