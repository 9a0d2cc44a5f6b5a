"""The attention backend interfaces: what LlamaModel calls for plain causal attention and
for a long-context sequence (resident regions plus memory)."""

from __future__ import annotations

from typing import Protocol

import torch

from infinikv.attention.memory_reads import LongContextState
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.rope import RotaryEmbedding


class AttentionBackend(Protocol):
    """Causal attention of a chunk of queries over one sequence's paged cache.

    q:           (n, Hq, d) queries, before RoPE
    q_positions: (n,) long, absolute positions of the queries
    kv:          one layer's pages (keys before RoPE, keys at their own positions, values)
    pages:       the sequence's block table (PageList)
    kv_len:      tokens of the sequence in the cache (the chunk's own keys included)
    returns:     (n, Hq, d)
    """

    def __call__(
        self,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        kv: LayerKV,
        pages: PageList,
        kv_len: int,
        rope: RotaryEmbedding,
    ) -> torch.Tensor: ...


class LongContextAttentionBackend(Protocol):
    """Attention of a chunk of queries of a long-context sequence: sinks, neighbor window
    and Self-Extend groups over its `resident` tokens, plus its memory (`state`); the
    arguments of AttentionBackend otherwise, and the layer (which memory index to read)."""

    def __call__(
        self,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        kv: LayerKV,
        pages: PageList,
        resident: int,
        layer: int,
        rope: RotaryEmbedding,
        state: LongContextState,
    ) -> torch.Tensor: ...
