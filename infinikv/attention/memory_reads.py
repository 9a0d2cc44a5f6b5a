"""What a long-context query reads from its sequence's evicted memory, shared by every
backend: the state a long-context entry takes, the memory queries (rotated by the memory
distance), what they select (tokens or whole blocks per group of query rows), and the
plain-PyTorch maths of attending to the selection."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from infinikv.core.partial import Partial, folded_partial
from infinikv.core.rope import RotaryEmbedding
from infinikv.core.self_extend import SelfExtend, at_memory_distance, memory_partial
from infinikv.memory.evicted import EvictedMemory

# Trailing positions of a forward whose logits are read that retrieve memory for themselves
# at block granularity: the last one predicts the next token; a speculative verification
# reads the logits of up to 1 + num_draft positions (num_draft <= 16).
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
    # Block granularity: trailing positions of this forward that retrieve for themselves; 0
    # where no one reads its logits (an ingestion, a prompt's chunks before the last).
    own_positions: int = OWN_BLOCK_POSITIONS
    # The dtype the CPU backend's prefill chunks past the window read their resident keys
    # and values in (None: the queries'); the plain-PyTorch backend keeps the queries'.
    chunk_dtype: torch.dtype | None = None


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
    granularity: the query heads of each of the last state.own_positions positions (those
    whose logits are read: the next token, a draft's verification) choose their blocks
    together, as in a decode step, by approximate logits over the key sketch; earlier
    positions of a prefill chunk share one set of blocks, by the summary bound of each
    query head's mean query over them (the probe's "bound-mean": more of exact attention's
    mass than every row's favourites on held-out text, at 1/positions of the search). With
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
    split = max(0, n_rows - state.own_positions * g)
    if split:
        shared = shared_chunk_queries(search[:, :split], g)
        yield queries[:, None, :split], memory.select_blocks(layer, shared, state.max_blocks, "bound")
    if split == n_rows:
        return
    if state.token_top_k:  # each trailing query row its own tokens, one row at a time
        best = memory.top_tokens(layer, search[:, split:], state.token_top_k)  # (Hkv, rows, K)
        for i in range(best.shape[1]):  # so RAM holds one row's blocks per kv-head at once
            yield queries[:, split + i : split + i + 1, None], memory.slab_rows(layer, best[:, i : i + 1])
        return
    group = search[:, split:].reshape(Hkv, -1, g, d)  # (Hkv, positions, g, d)
    rows = memory.select_blocks(layer, group, state.max_blocks, "sketch", position + split // g)
    yield queries[:, split:].view(Hkv, -1, g, d), rows


def shared_chunk_queries(rows: torch.Tensor, g: int) -> torch.Tensor:
    """Rows (Hkv, n * g, d), (position, head in group), of positions that share their blocks
    -> what ranks them (Hkv, 1, g, d): each query head's mean query over the positions."""
    Hkv, _, d = rows.shape
    return rows.view(Hkv, -1, g, d).mean(1)[:, None]


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
