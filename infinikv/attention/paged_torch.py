"""Plain-PyTorch paged causal attention: the reference every fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infinikv.model.rope import RotaryEmbedding, rotate


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of a block table: cache (P, B, H, d) -> (length, H, d)."""
    return cache[pages].flatten(0, 1)[:length]


def paged_causal_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    kv_len: int,
    rope: RotaryEmbedding,
) -> torch.Tensor:
    """See `AttentionBackend`. Keys sit at their own positions 0..kv_len-1."""
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q must be (n, Hq, {k_cache.shape[-1]}), got {tuple(q.shape)}")
    k = rotate(gather_pages(k_cache, pages, kv_len), rope.phases(kv_len))  # (T, Hkv, d)
    v = gather_pages(v_cache, pages, kv_len)  # (T, Hkv, d)
    qr = rotate(q, rope.at(q_positions))  # (n, Hq, d)
    n = q.shape[0]
    mask = None
    # A single query at the last position sees every key: skip building a mask.
    if not (n == 1 and int(q_positions[0]) == kv_len - 1):
        key_pos = torch.arange(kv_len, device=q.device)
        mask = key_pos[None, :] <= q_positions[:, None]  # (n, T)
    out = F.scaled_dot_product_attention(
        qr.transpose(0, 1).unsqueeze(0),  # (1, Hq, n, d)
        k.transpose(0, 1).unsqueeze(0),  # (1, Hkv, T, d)
        v.transpose(0, 1).unsqueeze(0),  # (1, Hkv, T, d)
        attn_mask=mask,
        enable_gqa=True,
    )  # (1, Hq, n, d)
    return out[0].transpose(0, 1)  # (n, Hq, d)
