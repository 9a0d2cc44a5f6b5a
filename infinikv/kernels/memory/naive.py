"""The plain-PyTorch reference for the memory kernel, on the same inputs."""

from __future__ import annotations

import torch

from infinikv.core.partial import Partial, merge_partials
from infinikv.core.self_extend import memory_partial


def memory_merge_naive(
    out: torch.Tensor,
    lse: torch.Tensor,
    queries: torch.Tensor,
    k_slab: torch.Tensor,
    v_slab: torch.Tensor,
    rows: torch.Tensor,
    row_offset: int = 0,
) -> Partial:
    """What `memory_merge_` writes (same arguments), returned as new tensors: the entries
    gathered, `memory_partial` per group row, merged with the resident part by LSE."""
    Hkv, P, m, d = queries.shape
    n, Hq = lse.shape
    g = Hq // Hkv
    valid = rows >= 0  # (Hkv, P, T)
    k = k_slab[rows.clamp_min(0)].where(valid[..., None], 0.0)  # (Hkv, P, T, d)
    v = v_slab[rows.clamp_min(0)].where(valid[..., None], 0.0)
    shape = (Hkv, P, m, rows.shape[2])
    mem_out, mem_lse = memory_partial(
        queries,
        k[:, :, None].expand(*shape, d),
        v[:, :, None].expand(*shape, d),
        valid[:, :, None].expand(shape),
    )  # (Hkv, P, m, d), (Hkv, P, m)
    r = row_offset + torch.arange(P * m, device=rows.device)  # group rows
    pos, head = r // g, torch.arange(Hkv, device=rows.device)[:, None] * g + r % g  # (P*m,), (Hkv, P*m)
    res = (out[pos, head], lse[pos, head])  # (Hkv, P*m, d), (Hkv, P*m)
    merged_out, merged_lse = merge_partials(
        [res, (mem_out.reshape(Hkv, P * m, d), mem_lse.reshape(Hkv, P * m))]
    )
    new_out, new_lse = out.clone(), lse.clone()
    new_out[pos, head], new_lse[pos, head] = merged_out.to(out.dtype), merged_lse
    return new_out, new_lse
