"""The Llama-family decoder: config, rotary embedding, forward pass, weight loading."""

from infinikv.model.config import ModelConfig
from infinikv.model.llama import ForwardBatch, LlamaModel, SequenceSlice
from infinikv.model.loader import LoadedModel, load_model

__all__ = ["ForwardBatch", "LlamaModel", "LoadedModel", "ModelConfig", "SequenceSlice", "load_model"]
