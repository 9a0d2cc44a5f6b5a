"""Long-context attention over a paged sequence: resident regions (sinks, neighbor window,
Self-Extend groups) plus kNN memory over its evicted blocks, merged by log-sum-exp."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from infinikv.attention.paged_torch import attend
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.partial import (
    Partial,
    flash_partial,
    folded_partial,
    merge_partials,
)
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.core.self_extend import SelfExtend, at_memory_distance, memory_partial
from infinikv.memory.evicted import EvictedMemory

# Trailing positions of a forward that retrieve memory blocks for themselves at block
# granularity: the last one predicts the next token; a speculative verification reads the
# logits of up to 1 + num_draft positions (num_draft <= 16).
OWN_BLOCK_POSITIONS = 17


@dataclass
class LongContextState:
    """What one sequence's attention needs beyond its pages."""

    self_extend: SelfExtend
    top_k: int
    distance: int
    memory: EvictedMemory | None  # None: evicted blocks are dropped (sliding window)
    # Block granularity (memory.granularity "block"): whole blocks a query attends to; the
    # query heads of each trailing position choose together, a prefill chunk's others share.
    max_blocks: int = 0
    # Block granularity: > 0: the trailing positions' query heads each attend to their own
    # top tokens by the key sketch instead of blocks.
    token_top_k: int = 0


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
    n = q.shape[0]
    last = int(q_positions[-1])
    if last < state.self_extend.window:
        # The whole sequence is inside the neighbor window (so nothing was evicted either,
        # as W < R): the regions reduce to plain causal attention, so take the fast path.
        return attend(
            rotate(q, rope.at(q_positions)),
            pages.gather(kv.k_rope, resident),
            pages.gather(kv.v, resident),
            q_positions,
        )
    se = state.self_extend
    check_grouping(kv, se)
    k_pos = pages.positions[:resident]  # (T,)
    far_end, near_start = band_bounds(q_positions, k_pos, se.window)
    k_group = pages.gather(kv.k_group, near_start)  # (near_start, Hkv, d)
    k_rope = pages.gather(kv.k_rope, resident, far_end)  # (T - far_end, Hkv, d)
    v = pages.gather(kv.v, resident)  # (T, Hkv, d)
    memory = state.memory if state.memory is not None and state.memory.tokens else None
    if n == 1:
        qn = rotate(q, rope.at(q_positions))
        qg = rotate(q, rope.at(se.grouped_query_positions(q_positions))) if far_end else qn
        recalled = None if memory is None else recall(memory, layer, q, last, rope, state)
        return decode_attention(qg, k_group, qn, k_rope, v, recalled)
    parts = banded_resident_partials(q, q_positions, k_group, k_rope, v, k_pos, rope, se)
    if memory is not None:
        parts.append(memory_partial_by_head(memory, layer, q, q_positions, rope, state))
    return merge_partials(parts)[0]


def check_grouping(kv: LayerKV, se: SelfExtend) -> None:
    if kv.group != se.group:
        raise ValueError(f"the page pool holds keys grouped by {kv.group}, Self-Extend groups by {se.group}")


def memory_partial_by_head(
    memory: EvictedMemory,
    layer: int,
    q: torch.Tensor,
    q_positions: torch.Tensor,
    rope: RotaryEmbedding,
    state: LongContextState,
) -> Partial:
    """The memory part of queries q (n, Hq, d) before RoPE at consecutive q_positions:
    out (n, Hq, d), lse (n, Hq)."""
    n, Hq, d = q.shape
    Hkv = memory.shape[2]
    g = Hq // Hkv
    queries = memory_queries(q, rope, state.distance, Hkv)  # (Hkv, n*g, d)
    out, lse = memory_attention(memory, layer, queries, int(q_positions[0]), state, g)  # (Hkv, n*g, ...)
    out = out.view(Hkv, n, g, d).transpose(0, 1).reshape(n, Hq, d)
    return out, lse.view(Hkv, n, g).transpose(0, 1).reshape(n, Hq)


def memory_queries(q: torch.Tensor, rope: RotaryEmbedding, distance: int, num_kv_heads: int) -> torch.Tensor:
    """q (n, Hq, d) before RoPE -> (Hkv, n * g, d) rotated by the memory distance, rows
    (position, head in group): what the memory is searched with and attends with."""
    n, Hq, d = q.shape
    qd = at_memory_distance(q, rope, distance)  # (n, Hq, d)
    return qd.view(n, num_kv_heads, Hq // num_kv_heads, d).transpose(0, 1).reshape(num_kv_heads, -1, d)


def memory_selections(
    memory: EvictedMemory, layer: int, queries: torch.Tensor, position: int, state: LongContextState, g: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """What each group of query rows attends to, in row order: (group (Hkv, P, m, d), slab
    rows (Hkv, P, T) of `memory.slab(layer)`, -1 for an empty slot). A selection may move
    blocks into the RAM tier, so each group's rows are valid until the next is drawn.

    Token granularity: each query row its top-k tokens (P = rows, m = 1). Block
    granularity: the query heads of each of the last OWN_BLOCK_POSITIONS positions (those
    whose logits are read: the next token, a draft's verification) choose their blocks
    together, as in a decode step, by approximate logits over the key sketch; earlier
    positions of a prefill chunk share one set of blocks, by summary bound. With
    state.token_top_k the trailing query rows each take their own top tokens over the
    sketch instead, one row per group. `position`:
    the first query row's position (the rows' positions are consecutive).
    """
    search = queries.float()  # the index copies what it searches to the host itself
    if memory.granularity == "token":
        rows, valid = memory.select(layer, search, state.top_k)  # (Hkv, n*g, K)
        yield queries[:, :, None], rows.where(valid.to(rows.device), -1)
        return
    Hkv, n_rows, d = queries.shape
    split = max(0, n_rows - OWN_BLOCK_POSITIONS * g)
    if split:
        group = search[:, None, :split]  # (Hkv, 1, split, d)
        yield queries[:, None, :split], memory.select_blocks(layer, group, state.max_blocks, "bound")
    if state.token_top_k:  # each trailing query row its own tokens, one row at a time
        best = memory.top_tokens(layer, search[:, split:], state.token_top_k)  # (Hkv, rows, K)
        for i in range(best.shape[1]):  # so RAM holds one row's blocks per kv-head at once
            yield queries[:, split + i : split + i + 1, None], memory.slab_rows(layer, best[:, i : i + 1])
        return
    group = search[:, split:].reshape(Hkv, -1, g, d)  # (Hkv, positions, g, d)
    rows = memory.select_blocks(layer, group, state.max_blocks, "sketch", position + split // g)
    yield queries[:, split:].view(Hkv, -1, g, d), rows


def recall(
    memory: EvictedMemory,
    layer: int,
    q: torch.Tensor,
    position: int,
    rope: RotaryEmbedding,
    state: LongContextState,
) -> Recalled:
    """What the query (1, Hq, d) before RoPE of a decode step at `position` recalls."""
    Hkv = memory.shape[2]
    queries = memory_queries(q, rope, state.distance, Hkv)  # (Hkv, g, d)
    selections = memory_selections(memory, layer, queries, position, state, q.shape[1] // Hkv)
    # gather copies, so each group's entries stay valid past the next selection
    picked = [(group, *memory.gather(layer, rows.clamp_min(0)), rows) for group, rows in selections]
    groups, keys, values, rows = (_joined(parts) for parts in zip(*picked, strict=True))
    return Recalled(groups, keys, values, None if memory.granularity == "block" else rows >= 0)


def _joined(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Groups' tensors side by side (dim 1); a decode step's one group without a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def memory_attention(
    memory: EvictedMemory,
    layer: int,
    queries: torch.Tensor,
    position: int,
    state: LongContextState,
    g: int,
) -> Partial:
    """Attention of queries (Hkv, n * g, d), rows (position, head in group) from `position`
    on, rotated by the memory distance, to what `memory_selections` picks for them; out (Hkv, n * g, d),
    lse (Hkv, n * g)."""
    Hkv, _, d = queries.shape
    parts = []
    for group, rows in memory_selections(memory, layer, queries, position, state, g):
        k, v = memory.gather(layer, rows.clamp_min(0))  # (Hkv, P, T, d)
        if memory.granularity == "token":  # m = 1, each row its own entries, some empty
            parts.append(memory_partial(group, k[:, :, None], v[:, :, None], (rows >= 0)[:, :, None]))
        else:
            parts.append(folded_partial(group, k, v))
    out = torch.cat([o.reshape(Hkv, -1, d) for o, _ in parts], 1)
    return out, torch.cat([lse.reshape(Hkv, -1) for _, lse in parts], 1)


def band_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> tuple[int, int]:
    """(far_end, near_start) for queries q_pos (n,), the last n of the resident keys k_pos
    (T,), sorted: keys [0, far_end) are far from every query (Self-Extend's grouped
    placement), [near_start, T) near every query (exact positions), the band between near
    for some queries and far for the others (n - 1 keys at most; none for one query)."""
    s, n = int(q_pos[0]), q_pos.shape[0]
    far_end = int(torch.searchsorted(k_pos, s - window, right=True))
    near_start = int(torch.searchsorted(k_pos, s + n - 1 - window, right=True))
    return far_end, near_start


def banded_resident_partials(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_group: torch.Tensor,
    k_rope: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    rope: RotaryEmbedding,
    se: SelfExtend,
) -> list[Partial]:
    """`resident_partials` for a chunk of n <= W queries that are the last n of T resident
    tokens, with the keys (sorted by position) cut by `band_bounds` into three runs so
    that masks are only needed on a thin band (every run through the fused kernel):

    * p <= s - W: far from every query: grouped positions, no mask (fused kernel);
    * s - W < p <= s + n - 1 - W: near for some queries, far for others (both placements,
      each masked to its queries; n - 1 keys);
    * p > s + n - 1 - W: near for every query: exact positions, the prefix without a mask,
      the chunk's own keys causal (fused kernel).

    k_group: keys [0, near_start) rotated at their grouped positions; k_rope: keys
    [far_end, T) rotated at their own positions (the page pool keeps both); v: all T.
    (A decode step, n = 1, has no band: `decode_attention` takes both runs in one softmax.)
    """
    n, W = q.shape[0], se.window
    if n > W:
        raise ValueError(f"a chunk of {n} queries exceeds the Self-Extend window W={W}")
    T = v.shape[0]
    near_start, far_end = k_group.shape[0], T - k_rope.shape[0]
    qn = rotate(q, rope.at(q_pos))  # (n, Hq, d) at exact positions
    qg = rotate(q, rope.at(se.grouped_query_positions(q_pos))) if near_start else qn  # (n, Hq, d)
    own = T - n
    parts = [flash_partial(qn, k_rope[own - far_end :], v[own:], causal=True)]
    if own > near_start:
        parts.append(
            flash_partial(qn, k_rope[near_start - far_end : own - far_end], v[near_start:own], causal=False)
        )
    if far_end:
        parts.append(flash_partial(qg, k_group[:far_end], v[:far_end], causal=False))
    if near_start > far_end:
        band = slice(far_end, near_start)
        rel = q_pos[:, None] - k_pos[None, band]  # (n, band)
        parts.append(
            flash_partial(qn, k_rope[: near_start - far_end], v[band], False, (rel >= 0) & (rel < W))
        )
        parts.append(flash_partial(qg, k_group[band], v[band], False, rel >= W))
    return parts


class Recalled(NamedTuple):
    """The memory entries one decode step's query heads attend to: queries (Hkv, P, m, d)
    rotated by the memory distance, P * m = the g query heads of each kv-head (block
    granularity: P = 1, the heads share their blocks; token: m = 1, each head its own
    entries); keys (before RoPE) and values (Hkv, P, K, d); valid (Hkv, P, K) bool, False
    for an empty slot, or None."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None


def decode_attention(
    qa: torch.Tensor,
    ka: torch.Tensor,
    qb: torch.Tensor,
    kb: torch.Tensor,
    v: torch.Tensor,
    recalled: Recalled | None = None,
) -> torch.Tensor:
    """One query (1, Hq, d) over its whole context in one softmax: two resident runs of
    keys, each with its own rotation of the query, qa over ka (Ta, Hkv, d) and qb over kb
    (Tb, Hkv, d), v (Ta + Tb, Hkv, d) in the same order, and the memory entries it
    recalled, if any. Batched matmuls: for a single query row that is cheaper than
    fused-kernel calls and a log-sum-exp merge of their parts (see SMALL_QUERY_ROWS).
    Returns (1, Hq, d)."""
    _, Hq, d = qa.shape
    Hkv = v.shape[1]
    g = Hq // Hkv
    scores = [torch.bmm(q.view(Hkv, g, d), k.permute(1, 2, 0)).float() for q, k in ((qa, ka), (qb, kb))]
    if recalled is not None:
        queries, keys, _, valid = recalled
        logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2))  # (Hkv, P, m, K)
        if valid is not None:
            logits.masked_fill_(~valid[:, :, None], float("-inf"))
        scores.append(logits.view(Hkv, g, -1))
    probs = torch.cat(scores, -1).mul_(d**-0.5).softmax(-1)  # (Hkv, g, Ta + Tb + K)
    T = v.shape[0]
    out = torch.bmm(probs[..., :T].to(v.dtype), v.transpose(0, 1)).float()  # (Hkv, g, d)
    if recalled is not None:
        P, m, K = recalled.keys.shape[1], recalled.queries.shape[2], recalled.keys.shape[2]
        out += torch.matmul(probs[..., T:].view(Hkv, P, m, K), recalled.values.float()).view(Hkv, g, d)
    return out.view(1, Hq, d).to(qa.dtype)
