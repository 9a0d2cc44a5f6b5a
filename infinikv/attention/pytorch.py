"""The plain-PyTorch attention backend (any device; the reference every fast path is tested
against): paged causal attention, and long-context attention over a paged sequence, its
resident regions (sinks, neighbor window, Self-Extend groups) plus the kNN memory over its
evicted blocks, merged by log-sum-exp."""

from __future__ import annotations

import torch

from infinikv.attention.memory_reads import LongContextState, Recalled, memory_partial_by_head, recall
from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.partial import Partial, flash_partial, merge_partials
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.core.self_extend import SelfExtend


def paged_causal_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    kv_len: int,
    rope: RotaryEmbedding,
) -> torch.Tensor:
    """See `AttentionBackend`. Keys sit at their own positions 0..kv_len-1."""
    if q.dim() != 3 or q.shape[-1] != kv.k.shape[-1]:
        raise ValueError(f"q must be (n, Hq, {kv.k.shape[-1]}), got {tuple(q.shape)}")
    k = pages.gather(kv.k_rope, kv_len).to(q.dtype)  # (T, Hkv, d), already at positions 0..T-1
    v = pages.gather(kv.v, kv_len).to(q.dtype)  # (T, Hkv, d)
    qr = rotate(q, rope.at(q_positions))  # (n, Hq, d)
    return attend(qr, k, v, q_positions)


# Up to this many query rows per kv-head, two batched matmuls beat the fused flash kernel
# on CPU (decode and short draft verification: measured 7.5 vs 10.4 ms per token over 2k
# keys for SmolLM2's 30 layers, 9 query heads, 3 kv-heads).
SMALL_QUERY_ROWS = 32


def check_last(q_positions: torch.Tensor, T: int) -> None:
    """Causal attention here takes queries that are the last of the T tokens."""
    n = q_positions.shape[0]
    if int(q_positions[0]) != T - n:
        raise ValueError(
            f"queries must be the last {n} of {T} tokens, got first position {int(q_positions[0])}"
        )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of rotated q (n, Hq, d), the last n tokens of a sequence, over its
    rotated k, v (T, Hkv, d). Returns (n, Hq, d)."""
    n, Hq, d = q.shape
    T, Hkv = k.shape[0], k.shape[1]
    check_last(q_positions, T)
    g = Hq // Hkv
    if n * g > SMALL_QUERY_ROWS:
        # The chunk sees the whole prefix (no mask) and itself causally: two fused calls,
        # merged by log-sum-exp, instead of one call over a dense (n, T) mask.
        s = T - n
        own = flash_partial(q, k[s:], v[s:], causal=True)
        parts = [flash_partial(q, k[:s], v[:s], causal=False), own] if s else [own]
        return merge_partials(parts)[0]
    qg = q.view(n, Hkv, g, d).transpose(0, 1).reshape(Hkv, n * g, d)  # (Hkv, n*g, d)
    scores = torch.bmm(qg, k.permute(1, 2, 0)).mul_(d**-0.5)  # (Hkv, n*g, T)
    if n > 1:
        hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)  # (n, n) future
        scores[..., T - n :].view(Hkv, n, g, n).masked_fill_(hidden[None, :, None, :], float("-inf"))
    out = torch.bmm(scores.softmax(dim=-1), v.transpose(0, 1))  # (Hkv, n*g, d)
    return out.view(Hkv, n, g, d).transpose(0, 1).reshape(n, Hq, d)


def paged_long_context_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    kv: LayerKV,
    pages: PageList,
    resident: int,
    layer: int,
    rope: RotaryEmbedding,
    state: LongContextState,
    chunk_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """q (n, Hq, d) before RoPE at q_positions (n,); `resident` tokens in `pages`; a chunk
    of several queries attends to the resident keys in `chunk_dtype` (None: q's).
    Returns (n, Hq, d)."""
    n = q.shape[0]
    last = int(q_positions[-1])
    if last < state.self_extend.window:
        # The whole sequence is inside the neighbor window (so nothing was evicted either,
        # as W < R): the regions reduce to plain causal attention, so take the fast path.
        return attend(
            rotate(q, rope.at(q_positions)),
            pages.gather(kv.k_rope, resident).to(q.dtype),
            pages.gather(kv.v, resident).to(q.dtype),
            q_positions,
        )
    se = state.self_extend
    check_grouping(kv, se)
    k_pos = pages.positions[:resident]  # (T,)
    far_end, near_start = resident_bounds(q_positions, k_pos, se)
    keys = q.dtype if n == 1 or chunk_dtype is None else chunk_dtype  # what attention reads them in
    k_group = pages.gather(kv.k_group, near_start).to(keys)  # (near_start, Hkv, d)
    k_rope = pages.gather(kv.k_rope, resident, far_end).to(keys)  # (T - far_end, Hkv, d)
    v = pages.gather(kv.v, resident).to(keys)  # (T, Hkv, d)
    memory = state.memory if state.memory is not None and state.memory.tokens else None
    if n == 1:
        qn = rotate(q, rope.at(q_positions))
        qg = rotate(q, rope.at(se.grouped_query_positions(q_positions))) if far_end else qn
        recalled = None if memory is None else recall(memory, layer, q, last, rope, state)
        return decode_attention(qg, k_group, qn, k_rope, v, recalled)
    parts = banded_resident_partials(q, q_positions, k_group, k_rope, v, k_pos, rope, se, chunk_dtype)
    if memory is not None:
        parts.append(memory_partial_by_head(memory, layer, q, q_positions, rope, state))
    return merge_partials(parts)[0]


def check_grouping(kv: LayerKV, se: SelfExtend) -> None:
    if kv.group != se.group:
        raise ValueError(f"the page pool holds keys grouped by {kv.group}, Self-Extend groups by {se.group}")


def band_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> tuple[int, int]:
    """(far_end, near_start) for queries q_pos (n,), the last n of the resident keys k_pos
    (T,), sorted: keys [0, far_end) are far from every query (Self-Extend's grouped
    placement), [near_start, T) near every query (exact positions), the band between near
    for some queries and far for the others (n - 1 keys at most; none for one query)."""
    s, n = int(q_pos[0]), q_pos.shape[0]
    far_end = int(torch.searchsorted(k_pos, s - window, right=True))
    near_start = int(torch.searchsorted(k_pos, s + n - 1 - window, right=True))
    return far_end, near_start


def resident_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor, se: SelfExtend) -> tuple[int, int]:
    """`band_bounds` under `se`; groups of one place every key at its own position, so
    every key reads as near: (0, 0)."""
    return band_bounds(q_pos, k_pos, se.window) if se.group > 1 else (0, 0)


def banded_resident_partials(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_group: torch.Tensor,
    k_rope: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    rope: RotaryEmbedding,
    se: SelfExtend,
    dtype: torch.dtype | None = None,
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
    The fused kernel reads queries, keys and values in `dtype` (None: q's); the parts' outputs
    come back in q's. (A decode step, n = 1, has no band: `decode_attention` takes both runs
    in one softmax.)
    """
    n, W = q.shape[0], se.window
    if n > W:
        raise ValueError(f"a chunk of {n} queries exceeds the Self-Extend window W={W}")
    T = v.shape[0]
    near_start, far_end = k_group.shape[0], T - k_rope.shape[0]
    qn = rotate(q, rope.at(q_pos))  # (n, Hq, d) at exact positions
    qg = rotate(q, rope.at(se.grouped_query_positions(q_pos))) if near_start else qn  # (n, Hq, d)
    if dtype is not None and dtype != q.dtype:
        qn, qg, k_group, k_rope, v = (x.to(dtype) for x in (qn, qg, k_group, k_rope, v))
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
        parts += band_partials(qn, qg, k_group[band], k_rope[: near_start - far_end], v[band], rel, W)
    return [(out.to(q.dtype), lse) for out, lse in parts]


def band_partials(
    qn: torch.Tensor,
    qg: torch.Tensor,
    k_group: torch.Tensor,
    k_rope: torch.Tensor,
    v: torch.Tensor,
    rel: torch.Tensor,
    window: int,
) -> list[Partial]:
    """The band's two partials: its keys (band, Hkv, d) near a query (0 <= rel < window, rel
    (n, band) its position minus theirs) at their own positions for qn, the others grouped
    for qg."""
    return [
        flash_partial(qn, k_rope, v, False, (rel >= 0) & (rel < window)),
        flash_partial(qg, k_group, v, False, rel >= window),
    ]


def decode_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One rotated query (1, Hq, d) against keys (T, Hkv, d): unscaled float32 logits
    (Hkv, g, T), each kv-head's g query heads sharing its keys."""
    _, Hq, d = q.shape
    Hkv = k.shape[1]
    return torch.bmm(q.view(Hkv, Hq // Hkv, d), k.permute(1, 2, 0)).float()


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
    scores = [decode_logits(q, k) for q, k in ((qa, ka), (qb, kb))]
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
