"""Memory attention merged into the resident attention (Triton).

One program owns a tile of the m query rows of one group (kv-head h, group p): they
attend to the group's T retrieved entries, gathered from the block slab through a row
table (row -1: an empty result slot), with the queries already rotated by the memory
distance D (the vector the memory was searched with), so the keys are read un-rotated.
The result is merged into the resident output and log-sum-exp of the same rows in place.
Group row r (counted over the whole group layout, plus `row_offset`) is query position
r // g, head h * g + r % g of the resident (n, Hq) layout.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def memory_merge_fwd(
    Q, KS, VS, ROWS, OUT, LSE,
    groups, m, num_entries, row_offset, qk_scale,
    sq_h, sq_p, sq_m, sq_d,
    sks_r, sks_d, svs_r, svs_d,
    sr_h, sr_p, sr_t,
    so_n, so_h, so_d, sl_n, sl_h,
    GQA: tl.constexpr, HEAD: tl.constexpr, HEAD_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    hp = tl.program_id(0)
    h = hp // groups
    p = hp % groups
    mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,)
    row_ok = mm < m
    dims = tl.arange(0, HEAD_P)
    dims_ok = dims < HEAD
    q_ok = row_ok[:, None] & dims_ok[None, :]
    q = tl.load(Q + h * sq_h + p * sq_p + mm[:, None] * sq_m + dims[None, :] * sq_d, mask=q_ok, other=0.0)
    # qk_scale = d^-0.5 * log2(e): scores in base 2, softmax with exp2.
    q = (q.to(tl.float32) * qk_scale).to(KS.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_P], tl.float32)
    for t0 in range(0, num_entries, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        row = tl.load(ROWS + h * sr_h + p * sr_p + t * sr_t, mask=t < num_entries, other=-1)  # (N,)
        ok = row >= 0
        kv_ok = ok[:, None] & dims_ok[None, :]
        k = tl.load(KS + row[:, None] * sks_r + dims[None, :] * sks_d, mask=kv_ok, other=0.0)  # (N, HEAD)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (M, N)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        prob = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        v = tl.load(VS + row[:, None] * svs_r + dims[None, :] * svs_d, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Merge with the resident part: weights exp(lse_part - lse_total), in base 2.
    r = p * m + mm + row_offset
    at_o = OUT + (r // GQA)[:, None] * so_n + (h * GQA + r % GQA)[:, None] * so_h + dims[None, :] * so_d
    at_l = LSE + (r // GQA) * sl_n + (h * GQA + r % GQA) * sl_h
    res_out = tl.load(at_o, mask=q_ok, other=0.0).to(tl.float32)
    res_lse = tl.load(at_l, mask=row_ok, other=float("-inf")) * 1.4426950408889634  # base 2
    mem_lse = m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0))
    mem_lse = tl.where(l_i > 0.0, mem_lse, float("-inf"))
    top = tl.maximum(res_lse, mem_lse)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_res = tl.exp2(res_lse - top)
    w_mem = tl.exp2(mem_lse - top)
    total = w_res + w_mem
    denom = tl.where(total > 0.0, total, 1.0)
    mem_out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    merged = (w_res[:, None] * res_out + w_mem[:, None] * mem_out) / denom[:, None]
    lse = tl.where(total > 0.0, (top + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
    tl.store(at_o, merged.to(OUT.dtype.element_ty), mask=q_ok)
    tl.store(at_l, lse, mask=row_ok)
