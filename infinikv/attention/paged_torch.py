"""Plain-PyTorch paged causal attention: the reference every fast path is tested against."""

from __future__ import annotations

import torch

from infinikv.cache.pages import LayerKV, PageList
from infinikv.core.partial import flash_partial, merge_partials
from infinikv.core.rope import RotaryEmbedding, rotate


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
