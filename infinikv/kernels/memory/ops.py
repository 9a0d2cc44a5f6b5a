"""Launcher for the memory-attention kernel."""

from __future__ import annotations

import torch
import triton

from infinikv.kernels import LOG2_E
from infinikv.kernels.memory.kernel import memory_merge_fwd

# Query rows per program (tl.dot's minimum of 16; a decode group has g <= 16 rows) and
# entries per step (flash-attention's 64-key tiles).
BLOCK_M, BLOCK_N = 16, 64


def memory_merge_(
    out: torch.Tensor,
    lse: torch.Tensor,
    queries: torch.Tensor,
    k_slab: torch.Tensor,
    v_slab: torch.Tensor,
    rows: torch.Tensor,
    row_offset: int = 0,
) -> None:
    """Attend each group's queries to its retrieved memory entries and merge the result
    into the resident attention `out`, `lse` in place.

    out (n, Hq, d), lse (n, Hq) float32: the resident partial attention;
    queries (Hkv, P, m, d): P groups of m query rows per kv-head, rotated by the memory
    distance; group row r (+ row_offset) is position r // g, head h * g + r % g (g = Hq / Hkv);
    k_slab, v_slab (S, d): memory rows (un-rotated keys, values); rows (Hkv, P, T) long: the
    slab row of each group's T entries, -1 for an empty slot.
    """
    Hkv, P, m, d = queries.shape
    n, Hq = lse.shape
    if (
        out.shape != (n, Hq, d)
        or rows.shape[:2] != (Hkv, P)
        or rows.dim() != 3
        or k_slab.shape[-1] != d
        or v_slab.shape != k_slab.shape
        or Hq % Hkv
        or row_offset + P * m > n * Hq // Hkv
    ):
        raise ValueError(
            f"need out (n, Hq, d), lse (n, Hq), queries (Hkv, P, m, d) covering at most n*Hq/Hkv rows, "
            f"rows (Hkv, P, T), slabs (S, d); got out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
            f"queries {tuple(queries.shape)}, rows {tuple(rows.shape)}, k {tuple(k_slab.shape)}, "
            f"v {tuple(v_slab.shape)}, row_offset {row_offset}"
        )
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    grid = (Hkv * P, triton.cdiv(m, BLOCK_M))
    memory_merge_fwd[grid](
        queries, k_slab, v_slab, rows, out, lse,
        P, m, rows.shape[2], row_offset, d**-0.5 * LOG2_E,
        *queries.stride(), *k_slab.stride(), *v_slab.stride(), *rows.stride(),
        *out.stride(), *lse.stride(),
        GQA=Hq // Hkv, HEAD=d, HEAD_P=triton.next_power_of_2(d), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if k_slab.dtype == torch.float32 else None,
    )  # fmt: skip
