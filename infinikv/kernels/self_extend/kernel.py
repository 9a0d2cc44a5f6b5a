"""Flash-style Self-Extend attention over the paged, pre-RoPE cache (Triton).

One program owns a tile of query rows of one kv-head (rows = (position, head in the GQA
group), so a decode step's g heads share the key loads) and a range of resident keys.
Keys are read through the block table, rotated inside the kernel at their exact position
(neighbor region) and at j // G (grouped region), and the queries at i and at
i // G + W - W // G: both regions of `infinikv.core.self_extend` in one pass with an
online softmax. A key tile that is near (or far) for every row skips the other placement.
Interleaved rotary pairs (dims 2f, 2f+1) are loaded whole (contiguous, vectorized) and split
into two half-width operands, so a rotated dot product is two `tl.dot`s.

Each program writes its rows' normalized output and log-sum-exp for its key range; with
several ranges per row (split-K, for decode over long windows) the wrapper merges them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs(at, ok, ROWS: tl.constexpr, HALF_P: tl.constexpr):
    """One contiguous (rows, 2 * HALF_P) load split into its even and odd columns (float32)."""
    x = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (ROWS, HALF_P, 2)))


@triton.jit
def _rotate(xe, xo, CS, pos, dims, dims_ok, stride_cs, ROWS: tl.constexpr, HALF_P: tl.constexpr):
    """Rotate interleaved pairs (xe, xo) (rows, HALF_P) by the phases of pos (rows,); CS holds
    (cos, sin) pairs per position, so one load gives both."""
    cos, sin = _pairs(CS + pos[:, None] * stride_cs + dims[None, :], dims_ok[None, :], ROWS, HALF_P)
    return xe * cos - xo * sin, xe * sin + xo * cos


# The lengths change every decode step: specializing on them (divisibility by 16) would
# compile a second variant in the middle of a generation.
@triton.jit(do_not_specialize=["n_rows", "keys_per_split", "num_keys"])
def self_extend_fwd(
    Q, QPOS, K, V, PAGES, KPOS, CS, OUT, LSE,
    n_rows, keys_per_split, num_keys, window, group, group_shift, qk_scale,
    sq_n, sq_h, sq_d,
    sk_p, sk_b, sk_h, sk_d,
    sv_p, sv_b, sv_h, sv_d,
    stride_cs,
    so_s, so_h, so_r,
    sl_s, sl_h,
    GQA: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    HEAD_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,)
    row_ok = rows < n_rows
    i = rows // GQA  # query position index
    head = h * GQA + rows % GQA
    dims = tl.arange(0, HEAD_P)
    dims_ok = dims < 2 * HALF

    q_at = Q + i[:, None] * sq_n + head[:, None] * sq_h + dims[None, :] * sq_d
    qe, qo = _pairs(q_at, row_ok[:, None] & dims_ok[None, :], BLOCK_M, HALF_P)  # (M, HALF_P) each
    qpos = tl.load(QPOS + i, mask=row_ok, other=0)  # (M,)
    # qk_scale = d^-0.5 * log2(e): scores come out in base 2, softmax uses exp2.
    qe, qo = qe * qk_scale, qo * qk_scale
    qe_n, qo_n = _rotate(qe, qo, CS, qpos, dims, dims_ok, stride_cs, BLOCK_M, HALF_P)
    qe_g, qo_g = _rotate(qe, qo, CS, qpos // group + group_shift, dims, dims_ok, stride_cs, BLOCK_M, HALF_P)
    dot_ty = K.dtype.element_ty
    qe_n, qo_n = qe_n.to(dot_ty), qo_n.to(dot_ty)
    qe_g, qo_g = qe_g.to(dot_ty), qo_g.to(dot_ty)
    q_lo = tl.min(tl.where(row_ok, qpos, 2**62))
    q_hi = tl.max(tl.where(row_ok, qpos, -1))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_P], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, num_keys)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)  # (N,) resident key index
        t_ok = t < end
        page = tl.load(PAGES + t // PAGE, mask=t_ok, other=0)
        kpos = tl.load(KPOS + t, mask=t_ok, other=0)
        k_at = K + page[:, None] * sk_p + (t % PAGE)[:, None] * sk_b + h * sk_h + dims[None, :] * sk_d
        ke, ko = _pairs(k_at, t_ok[:, None] & dims_ok[None, :], BLOCK_N, HALF_P)  # (N, HALF_P) each
        k_lo = tl.min(tl.where(t_ok, kpos, 2**62))
        k_hi = tl.max(tl.where(t_ok, kpos, -1))
        rel = qpos[:, None] - kpos[None, :]  # (M, N)
        s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        if (q_hi >= k_lo) & (q_lo - k_hi < window):  # some pair in the neighbor window
            ke_n, ko_n = _rotate(ke, ko, CS, kpos, dims, dims_ok, stride_cs, BLOCK_N, HALF_P)
            near = tl.dot(qe_n, tl.trans(ke_n.to(dot_ty)), input_precision=PRECISION)
            near += tl.dot(qo_n, tl.trans(ko_n.to(dot_ty)), input_precision=PRECISION)
            s = tl.where((rel >= 0) & (rel < window), near, s)
        if q_hi - k_lo >= window:  # some pair in the grouped region
            ke_g, ko_g = _rotate(ke, ko, CS, kpos // group, dims, dims_ok, stride_cs, BLOCK_N, HALF_P)
            far = tl.dot(qe_g, tl.trans(ke_g.to(dot_ty)), input_precision=PRECISION)
            far += tl.dot(qo_g, tl.trans(ko_g.to(dot_ty)), input_precision=PRECISION)
            s = tl.where(rel >= window, far, s)
        s = tl.where(row_ok[:, None] & t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # (M, N)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_at = V + page[:, None] * sv_p + (t % PAGE)[:, None] * sv_b + h * sv_h + dims[None, :] * sv_d
        v = tl.load(v_at, mask=t_ok[:, None] & dims_ok[None, :], other=0.0)  # (N, HEAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_at = OUT + split * so_s + h * so_h + rows[:, None] * so_r + dims[None, :]
    tl.store(o_at, out, mask=row_ok[:, None] & dims_ok[None, :])
    tl.store(LSE + split * sl_s + h * sl_h + rows, lse, mask=row_ok)
