"""The launcher of the Self-Extend kernel: a multi-query chunk (prefill, draft verification)
or a single-token decode step split over the keys (split-K)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from infinikv.cache.pages import PageList
from infinikv.core.partial import Partial, merge_stacked
from infinikv.core.rope import RotaryEmbedding
from infinikv.core.self_extend import SelfExtend
from infinikv.kernels import LOG2_E
from infinikv.kernels.self_extend.kernel import self_extend_fwd

# tl.dot needs every operand dimension >= 16: the rotary half-width is one of them.
MIN_HALF_DIM = 16


class Launch(NamedTuple):
    """Tile sizes and Triton launch options of one kernel call."""

    block_m: int  # query rows per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


# The fastest of benchmarks/sweep_self_extend.py's grid on an H100 (Llama-3-8B attention,
# bf16, 32k keys). A decode step has g (<= 16 for the Llama family's GQA) rows per kv-head:
# one 16-row tile.
CHUNK_LAUNCH = Launch(block_m=128, block_n=64, num_warps=8, num_stages=2)
DECODE_LAUNCH = Launch(block_m=16, block_n=128, num_warps=4, num_stages=2)
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
    launch: Launch | None = None,
) -> Partial:
    """Self-Extend attention (neighbor + grouped regions) of a chunk of queries over the
    first num_keys resident tokens of `pages`.

    q: (n, Hq, d) before RoPE at absolute positions q_pos (n,) long, resident tokens of
    `pages`; k_pages, v_pages: (P, B, Hkv, d), keys before RoPE (any strides). Returns out
    (n, Hq, d) in q's dtype and lse (n, Hq) float32, as
    `infinikv.core.self_extend.resident_partials` merged.

    A chunk (n > 1: prefill, draft verification) runs CHUNK_LAUNCH's query tiles over all
    its keys. One position (decode) runs one 16-row tile per kv-head with its keys cut into
    `splits` ranges (default: by length) that run in parallel and are merged by log-sum-exp.
    `launch` overrides the tile sizes and launch options (default: CHUNK_LAUNCH or
    DECODE_LAUNCH).
    """
    if q.dim() != 3 or k_pages.dim() != 4 or v_pages.shape != k_pages.shape or q_pos.shape != q.shape[:1]:
        raise ValueError(
            f"need q (n, Hq, d), q_pos (n,), k/v pages (P, B, Hkv, d); got q {tuple(q.shape)}, "
            f"q_pos {tuple(q_pos.shape)}, k {tuple(k_pages.shape)}, v {tuple(v_pages.shape)}"
        )
    n, Hq, d = q.shape
    P, B, Hkv, dk = k_pages.shape
    if Hq % Hkv or dk != d or d % 2 or d // 2 < MIN_HALF_DIM:
        raise ValueError(
            f"need Hq divisible by Hkv and one even head_dim >= {2 * MIN_HALF_DIM}, "
            f"got q {tuple(q.shape)}, k {tuple(k_pages.shape)}"
        )
    if not 0 < num_keys <= pages.positions.shape[0]:
        raise ValueError(
            f"num_keys {num_keys} outside the {pages.positions.shape[0]} slots of the block table"
        )
    launch = launch or (CHUNK_LAUNCH if n > 1 else DECODE_LAUNCH)
    if splits is None:
        splits = 1 if n > 1 else max(1, min(MAX_SPLITS, num_keys // MIN_KEYS_PER_SPLIT))
    g = Hq // Hkv
    rows = n * g
    # (L, d/2, 2): the queries are resident tokens, so pages.end bounds their positions
    # without reading them from the device; grouped positions are smaller.
    cs = rope.cos_sin(pages.end)
    per_split = triton.cdiv(triton.cdiv(num_keys, splits), launch.block_n) * launch.block_n
    splits = triton.cdiv(num_keys, per_split)
    out = torch.empty(splits, Hkv, rows, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, Hkv, rows, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(rows, launch.block_m), Hkv, splits)
    self_extend_fwd[grid](
        q, q_pos, k_pages, v_pages, pages.ids, pages.positions, cs, out, lse,
        rows, per_split, num_keys, se.window, se.group, se.window - se.window // se.group,
        d**-0.5 * LOG2_E,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), cs.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GQA=g, PAGE=B, HALF=d // 2, HALF_P=triton.next_power_of_2(d // 2),
        HEAD_P=triton.next_power_of_2(d), BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        PRECISION="ieee" if k_pages.dtype == torch.float32 else None,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    merged_out, merged_lse = merge_stacked(out, lse)  # over the splits: (Hkv, rows, d), (Hkv, rows)
    o = merged_out.view(Hkv, n, g, d).transpose(0, 1).reshape(n, Hq, d).to(q.dtype)
    return o, merged_lse.view(Hkv, n, g).transpose(0, 1).reshape(n, Hq)
