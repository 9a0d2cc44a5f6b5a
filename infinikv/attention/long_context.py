"""Long-context attention over a paged sequence: resident regions (sinks, neighbor window,
Self-Extend groups) plus kNN memory over its evicted blocks, merged by log-sum-exp."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinikv.attention.partial import merge_partials
from infinikv.attention.self_extend import SelfExtend, at_memory_distance, memory_partial, resident_partials
from infinikv.memory.evicted import EvictedMemory
from infinikv.memory.pages import LayerKV, PageList
from infinikv.model.rope import RotaryEmbedding


@dataclass
class LongContextState:
    """What one sequence's attention needs beyond its pages."""

    self_extend: SelfExtend
    top_k: int
    distance: int
    memory: EvictedMemory | None  # None: evicted blocks are dropped (sliding window)


def paged_long_context_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    resident: int,
    layer: int,
    rope: RotaryEmbedding,
    state: LongContextState,
) -> torch.Tensor:
    """q (n, Hq, d) before RoPE at q_positions (n,); `resident` tokens in `pages`.
    Returns (n, Hq, d)."""
    n, Hq, d = q.shape
    k_pos = pages.positions[:resident]  # (T,)
    k, k_rope, v = (pages.gather(cache, resident) for cache in (kv.k, kv.k_rope, kv.v))  # (T, Hkv, d)
    parts = resident_partials(q, q_positions, k, k_rope, v, k_pos, rope, state.self_extend)
    memory = state.memory
    if memory is not None and memory.tokens:
        Hkv = k.shape[1]
        g = Hq // Hkv
        qd = at_memory_distance(q, rope, state.distance)  # (n, Hq, d)
        queries = qd.view(n, Hkv, g, d).transpose(0, 1).reshape(Hkv, n * g, d)  # rows (i, j)
        k_mem, v_mem, valid = memory.retrieve(layer, queries, state.top_k)  # (Hkv, n*g, K, ...)
        K = k_mem.shape[2]

        def per_query_head(x: torch.Tensor) -> torch.Tensor:  # (Hkv, n*g, K, ...) -> (n, Hq, K, ...)
            return x.view(Hkv, n, g, K, *x.shape[3:]).transpose(0, 1).reshape(n, Hq, K, *x.shape[3:])

        parts.append(memory_partial(qd, per_query_head(k_mem), per_query_head(v_mem), per_query_head(valid)))
    return merge_partials(parts)[0]
