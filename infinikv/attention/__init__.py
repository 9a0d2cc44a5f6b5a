"""Attention over the paged, pre-RoPE KV cache, behind one small backend interface."""

from infinikv.attention.interface import AttentionBackend
from infinikv.attention.pytorch import paged_causal_attention

__all__ = ["AttentionBackend", "paged_causal_attention"]
