"""infinikv: memory-augmented long-context LLM generation."""

from infinikv.errors import InfinikvError

__all__ = ["InfinikvError"]
__version__ = "0.1.0"
