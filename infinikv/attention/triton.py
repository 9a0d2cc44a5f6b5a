"""The attention of `pytorch.py` through the Triton kernels: resident regions by the
Self-Extend kernel straight from the paged pre-RoPE keys, then each memory selection
attended to and merged in place by the memory kernel."""

from __future__ import annotations

import torch

from infinikv.attention.memory_reads import LongContextState, memory_queries, memory_selections
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.rope import RotaryEmbedding
from infinikv.core.self_extend import SelfExtend
from infinikv.kernels.memory.ops import memory_merge_
from infinikv.kernels.self_extend.ops import self_extend_attention


def triton_long_context_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    resident: int,
    layer: int,
    rope: RotaryEmbedding,
    state: LongContextState,
) -> torch.Tensor:
    """See `paged_long_context_attention`: q (n, Hq, d) before RoPE; returns (n, Hq, d)."""
    out, lse = self_extend_attention(q, q_positions, kv.k, kv.v, pages, resident, rope, state.self_extend)
    memory = state.memory
    if memory is not None and memory.tokens:
        Hkv = kv.k.shape[2]
        queries = memory_queries(q, rope, state.distance, Hkv)  # (Hkv, n*g, d)
        offset = 0
        position, g = int(q_positions[0]), q.shape[1] // Hkv
        for group, rows in memory_selections(memory, layer, queries, position, state, g):
            memory_merge_(out, lse, group, *memory.slab(layer), rows, offset)
            offset += group.shape[1] * group.shape[2]
    return out


def triton_causal_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    kv_len: int,
    rope: RotaryEmbedding,
) -> torch.Tensor:
    """See `AttentionBackend`: plain causal attention is Self-Extend with one group and a
    window wider than every distance (kv_len > every query position)."""
    return self_extend_attention(q, q_positions, kv.k, kv.v, pages, kv_len, rope, SelfExtend(kv_len, 1))[0]
