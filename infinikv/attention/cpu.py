"""The attention of `pytorch.py` through the CPU kernels (`infinikv.kernels.cpu`), which read
the pages in place: decode steps and short draft verifications in one pass over the keys for
all heads (a gather and batched matmuls read them at a fraction of the memory bandwidth),
prefill chunks in register tiles of query rows (~2x torch's fused flash kernel;
benchmarks/bench_kernels_cpu.py). Chunks read in bfloat16 (`chunk_dtype`) on CPUs with AMX
tiles, and every chunk where the kernels lack AVX-512 (`wide_vectors`), keep torch's kernel."""

from __future__ import annotations

import torch

from infinikv.attention.memory_reads import OWN_BLOCK_POSITIONS, LongContextState, memory_partial_by_head
from infinikv.attention.pytorch import (
    band_partials,
    check_grouping,
    check_last,
    paged_causal_attention,
    paged_long_context_attention,
    resident_bounds,
)
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.partial import merge_partials
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.kernels.cpu.ops import amx, bf16_dot, paged_attention, tiled, wide_vectors


def tiles_lose(q: torch.Tensor, kv: LayerKV) -> bool:
    """Whether q (n, Hq, d) is a chunk for the register tiles (over FOLD_ROWS rows per kv-head)
    on a build without AVX-512, where torch's flash kernel runs it faster."""
    return tiled(q.shape[0], q.shape[1], kv.k_rope.shape[-2]) and not wide_vectors()


def cpu_causal_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    kv_len: int,
    rope: RotaryEmbedding,
) -> torch.Tensor:
    """See `AttentionBackend`."""
    if tiles_lose(q, kv):
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
    """See `paged_long_context_attention`: the resident runs of `banded_resident_partials`
    (grouped keys far from every query, keys at their own positions near every query, the
    chunk's own causal; one causal run where groups are of one) through the kernels, the
    thin band between through torch's, merged with the memory by log-sum-exp. A prefill
    chunk (more positions than a draft verification) with `state.chunk_dtype` bfloat16 reads
    its runs in the kernel's bfloat16 tiles, or on CPUs with AMX (or without AVX512-BF16)
    takes the PyTorch path, as every chunk does where `tiles_lose`."""
    se = state.self_extend
    if int(q_positions[-1]) < se.window:  # all within the window: plain causal attention
        return cpu_causal_attention(q, q_positions, kv, pages, resident, rope)
    n = q.shape[0]
    dtype = state.chunk_dtype if n > OWN_BLOCK_POSITIONS else None
    bf16 = dtype == torch.bfloat16
    if (bf16 and (amx() or not bf16_dot())) or tiles_lose(q, kv):  # torch's: AMX tiles, or no AVX-512
        return paged_long_context_attention(q, q_positions, kv, pages, resident, layer, rope, state, dtype)
    check_grouping(kv, se)
    k_pos = pages.positions[:resident]
    far_end, near_start = resident_bounds(q_positions, k_pos, se)
    qn = rotate(q, rope.at(q_positions))  # (n, Hq, d)
    parts = [paged_attention(qn, kv.k_rope, kv.v, pages.ids, near_start, resident, n > 1, bf16=bf16)]
    if near_start:
        qg = rotate(q, rope.at(se.grouped_query_positions(q_positions)))
        if far_end:
            parts.append(paged_attention(qg, kv.k_group, kv.v, pages.ids, 0, far_end, False, bf16=bf16))
        if near_start > far_end:
            k_group, k_rope, v = (
                pages.gather(c, near_start, far_end).to(q.dtype) for c in (kv.k_group, kv.k_rope, kv.v)
            )
            rel = q_positions[:, None] - k_pos[None, far_end:near_start]  # (n, band)
            parts += band_partials(qn, qg, k_group, k_rope, v, rel, se.window)
    memory = state.memory
    if memory is not None and memory.tokens:
        parts.append(memory_partial_by_head(memory, layer, q, q_positions, rope, state))
    return merge_partials(parts)[0]
