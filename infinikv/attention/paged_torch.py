"""Plain-PyTorch paged causal attention: the reference every fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infinikv.memory.pages import LayerKV, PageList
from infinikv.model.rope import RotaryEmbedding, rotate


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
    k = pages.gather(kv.k_rope, kv_len)  # (T, Hkv, d), already at positions 0..T-1
    v = pages.gather(kv.v, kv_len)  # (T, Hkv, d)
    qr = rotate(q, rope.at(q_positions))  # (n, Hq, d)
    return attend(qr, k, v, q_positions)


# Up to this many query rows per kv-head, two batched matmuls beat SDPA's flash kernel on
# CPU (measured: decode with 9 query heads over 2k keys, benchmarks/bench_attention.py).
SMALL_QUERY_ROWS = 32


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of rotated q (n, Hq, d) over rotated k, v (T, Hkv, d), with key
    j visible to a query at position p when j <= p. Returns (n, Hq, d)."""
    n, Hq, d = q.shape
    T, Hkv = k.shape[0], k.shape[1]
    g = Hq // Hkv
    # A single query at the last position sees every key: no mask needed.
    causal = not (n == 1 and int(q_positions[0]) == T - 1)
    visible = None
    if causal:
        visible = torch.arange(T, device=q.device)[None, :] <= q_positions[:, None]  # (n, T)
    if n * g > SMALL_QUERY_ROWS:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # (1, Hq, n, d)
            k.transpose(0, 1).unsqueeze(0),  # (1, Hkv, T, d)
            v.transpose(0, 1).unsqueeze(0),  # (1, Hkv, T, d)
            attn_mask=visible,
            enable_gqa=True,
        )  # (1, Hq, n, d)
        return out[0].transpose(0, 1)
    qg = q.view(n, Hkv, g, d).transpose(0, 1).reshape(Hkv, n * g, d)  # (Hkv, n*g, d)
    scores = torch.bmm(qg, k.permute(1, 2, 0)).mul_(d**-0.5)  # (Hkv, n*g, T)
    if visible is not None:
        scores.view(Hkv, n, g, T).masked_fill_(~visible[None, :, None, :], float("-inf"))
    out = torch.bmm(scores.softmax(dim=-1), v.transpose(0, 1))  # (Hkv, n*g, d)
    return out.view(Hkv, n, g, d).transpose(0, 1).reshape(n, Hq, d)
