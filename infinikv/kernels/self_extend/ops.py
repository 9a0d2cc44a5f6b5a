"""The launcher of the Self-Extend kernel: a multi-query chunk (prefill, draft verification)
or a single-token decode step split over the keys (split-K)."""

from __future__ import annotations

import torch
import triton

from infinikv.attention.partial import Partial
from infinikv.attention.self_extend import SelfExtend
from infinikv.kernels.self_extend.kernel import self_extend_fwd
from infinikv.memory.pages import PageList
from infinikv.model.rope import RotaryEmbedding

LOG2_E = 1.4426950408889634
# tl.dot needs every operand dimension >= 16: the rotary half-width is one of them.
MIN_HALF_DIM = 16
# Query tile for chunks (flash-attention's 64 x 64 tiles with 4 warps). A decode step has
# g (<= 16 for the Llama family's GQA) rows per kv-head, one 16-row tile.
CHUNK_BLOCK_M, DECODE_BLOCK_M, BLOCK_N = 64, 16, 64
# Split-K: each decode program reads at least this many keys (fewer and the merge of the
# splits costs more than it saves), and a decode launches at most this many splits
# per kv-head (a few waves of an H100's 132 SMs at 3-8 kv-heads).
MIN_KEYS_PER_SPLIT, MAX_SPLITS = 256, 64


def self_extend_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pages: PageList,
    num_keys: int,
    rope: RotaryEmbedding,
    se: SelfExtend,
    splits: int | None = None,
) -> Partial:
    """Self-Extend attention (neighbor + grouped regions) of a chunk of queries over the
    first num_keys resident tokens of `pages`.

    q: (n, Hq, d) before RoPE at absolute positions q_pos (n,) long, resident tokens of
    `pages`; k_pages, v_pages: (P, B, Hkv, d), keys before RoPE (any strides). Returns out
    (n, Hq, d) in q's dtype and lse (n, Hq) float32, as
    `infinikv.attention.self_extend.resident_partials` merged.

    A chunk (n > 1: prefill, draft verification) runs 64-row query tiles over all its keys.
    One position (decode) runs one 16-row tile per kv-head with its keys cut into `splits`
    ranges (default: by length) that run in parallel and are merged by log-sum-exp.
    """
    if q.shape[0] > 1:
        return _launch(q, q_pos, k_pages, v_pages, pages, num_keys, rope, se, CHUNK_BLOCK_M, splits or 1)
    if splits is None:
        splits = max(1, min(MAX_SPLITS, num_keys // MIN_KEYS_PER_SPLIT))
    return _launch(q, q_pos, k_pages, v_pages, pages, num_keys, rope, se, DECODE_BLOCK_M, splits)


def _launch(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pages: PageList,
    num_keys: int,
    rope: RotaryEmbedding,
    se: SelfExtend,
    block_m: int,
    splits: int,
) -> Partial:
    n, Hq, d = q.shape
    P, B, Hkv, dk = k_pages.shape
    if q.dim() != 3 or dk != d or v_pages.shape != k_pages.shape or q_pos.shape != (n,):
        raise ValueError(
            f"need q (n, Hq, d), q_pos (n,), k/v pages (P, B, Hkv, d); got q {tuple(q.shape)}, "
            f"q_pos {tuple(q_pos.shape)}, k {tuple(k_pages.shape)}, v {tuple(v_pages.shape)}"
        )
    if Hq % Hkv or d % 2 or d // 2 < MIN_HALF_DIM:
        raise ValueError(
            f"need Hq divisible by Hkv and an even head_dim >= {2 * MIN_HALF_DIM}, got {q.shape}"
        )
    if not 0 < num_keys <= pages.positions.shape[0]:
        raise ValueError(
            f"num_keys {num_keys} outside the {pages.positions.shape[0]} slots of the block table"
        )
    g = Hq // Hkv
    rows = n * g
    # (L, d/2, 2): the queries are resident tokens, so pages.end bounds their positions
    # without reading them from the device; grouped positions are smaller.
    cs = rope.cos_sin(pages.end)
    per_split = triton.cdiv(triton.cdiv(num_keys, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(num_keys, per_split)
    out = torch.empty(splits, Hkv, rows, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, Hkv, rows, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(rows, block_m), Hkv, splits)
    self_extend_fwd[grid](
        q, q_pos, k_pages, v_pages, pages.ids, pages.positions, cs, out, lse,
        rows, per_split, num_keys, se.window, se.group, se.window - se.window // se.group,
        d**-0.5 * LOG2_E,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), cs.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GQA=g, PAGE=B, HALF=d // 2, HALF_P=triton.next_power_of_2(d // 2),
        HEAD_P=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if k_pages.dtype == torch.float32 else None,
    )  # fmt: skip
    if splits > 1:
        total = lse.logsumexp(0)  # (Hkv, rows)
        weights = torch.exp(lse - total).nan_to_num(0.0)  # splits that saw no key -> 0
        out, lse = (weights[..., None] * out).sum(0, keepdim=True), total[None]
    o = out[0].view(Hkv, n, g, d).transpose(0, 1).reshape(n, Hq, d).to(q.dtype)
    return o, lse[0].view(Hkv, n, g).transpose(0, 1).reshape(n, Hq)
