"""The attention of `pytorch.py` with decode steps and short draft verifications through the
CPU kernel (`infinikv.kernels.cpu`): one pass over the pages for all heads instead of a
gather and batched matmuls, which read the keys at a fraction of the memory bandwidth
(benchmarks/bench_kernels_cpu.py). Longer chunks (prefill) keep the PyTorch path, whose
fused flash kernel suits them."""

from __future__ import annotations

import torch

from infinikv.attention.memory_reads import OWN_BLOCK_POSITIONS, LongContextState, memory_partial_by_head
from infinikv.attention.pytorch import (
    SMALL_QUERY_ROWS,
    band_bounds,
    check_grouping,
    check_last,
    paged_causal_attention,
    paged_long_context_attention,
)
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.partial import merge_partials
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.kernels.cpu.ops import paged_attention


def cpu_causal_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    kv_len: int,
    rope: RotaryEmbedding,
) -> torch.Tensor:
    """See `AttentionBackend`."""
    n, Hq, _ = q.shape
    if n * Hq // kv.k.shape[2] > SMALL_QUERY_ROWS:
        return paged_causal_attention(q, q_positions, kv, pages, kv_len, rope)
    check_last(q_positions, kv_len)
    qr = rotate(q, rope.at(q_positions))  # (n, Hq, d)
    return paged_attention(qr, kv.k_rope, kv.v, pages.ids, 0, kv_len, causal=True)[0]


def cpu_long_context_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    resident: int,
    layer: int,
    rope: RotaryEmbedding,
    state: LongContextState,
) -> torch.Tensor:
    """See `paged_long_context_attention`; a decode step past the neighbor window reads its
    two resident runs (grouped keys, then keys at their own positions) through the kernel
    and merges them with its memory by log-sum-exp. A prefill chunk (more positions than a
    draft verification) reads its resident keys in `state.chunk_dtype`."""
    se = state.self_extend
    if int(q_positions[-1]) < se.window:  # all within the window: plain causal attention
        return cpu_causal_attention(q, q_positions, kv, pages, resident, rope)
    if q.shape[0] > 1:
        dtype = state.chunk_dtype if q.shape[0] > OWN_BLOCK_POSITIONS else None
        return paged_long_context_attention(q, q_positions, kv, pages, resident, layer, rope, state, dtype)
    check_grouping(kv, se)
    far_end = band_bounds(q_positions, pages.positions[:resident], se.window)[0]
    qn = rotate(q, rope.at(q_positions))  # (1, Hq, d)
    parts = [paged_attention(qn, kv.k_rope, kv.v, pages.ids, far_end, resident, causal=False)]
    if far_end:
        qg = rotate(q, rope.at(se.grouped_query_positions(q_positions)))
        parts.append(paged_attention(qg, kv.k_group, kv.v, pages.ids, 0, far_end, causal=False))
    memory = state.memory
    if memory is not None and memory.tokens:
        parts.append(memory_partial_by_head(memory, layer, q, q_positions, rope, state))
    return merge_partials(parts)[0]
