"""Partial attention (output plus log-sum-exp per query head) and the LSE merge.

Attention over a union of key sets equals the LSE-weighted merge of the attentions over
each set: with out_i, lse_i per part, out = sum_i exp(lse_i - lse) out_i where
lse = logsumexp_i(lse_i). Chunked prefill splits a chunk's keys into the prefix (no mask)
and the chunk itself (square causal); the long-context regions merge the same way.

Shapes: q (n, Hq, d) and k, v (T, Hkv, d), all already rotated; Hq = g * Hkv (GQA).
Returned out (n, Hq, d) in q's dtype, lse (n, Hq) float32.
"""

from __future__ import annotations

import torch

Partial = tuple[torch.Tensor, torch.Tensor]  # (out (n, Hq, d), lse (n, Hq))


def reference_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None
) -> Partial:
    """Plain PyTorch; `visible` (n, T) bool masks keys out. A query row with no visible key
    gets lse = -inf and a zero output, so it drops out of a merge."""
    n, Hq, d = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    qg = q.float().view(n, Hkv, g, d)
    scores = torch.einsum("nhgd,thd->hgnt", qg, k.float()) * d**-0.5  # (Hkv, g, n, T)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (Hkv, g, n)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with lse=-inf -> 0
    out = torch.einsum("hgnt,thd->nhgd", probs, v.float())  # (n, Hkv, g, d)
    return out.reshape(n, Hq, d).to(q.dtype), lse.permute(2, 0, 1).reshape(n, Hq)


def flash_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, visible: torch.Tensor | None = None
) -> Partial:
    """The same through the fused CPU flash kernel (which also returns the LSE); on other
    devices, `reference_partial`. causal: square causal mask (n == T, query i sees keys <= i);
    else `visible` (n, T) bool, if given, masks keys out as in `reference_partial` (a query
    row with no visible key gets lse = -inf and a zero output).

    Without the causal mask the query heads of a kv group are folded into the query-length
    axis, so the keys are read once per kv-head and never copied.
    """
    n, Hq, d = q.shape
    T, Hkv = k.shape[0], k.shape[1]
    g = Hq // Hkv
    if q.device.type != "cpu":
        if causal:
            visible = torch.ones(n, T, dtype=torch.bool, device=q.device).tril()
        return reference_partial(q, k, v, visible)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kt, vt = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # (1, Hkv, T, d)
    if causal:
        qt = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, n, d)
        kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)  # (1, Hq, T, d)
        out, lse = flash(qt, kt, vt, is_causal=True)[:2]  # (1, Hq, n, d), (1, Hq, n)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1)
    qf = q.view(n, Hkv, g, d).permute(1, 2, 0, 3).reshape(1, Hkv, g * n, d)  # rows (j, i)
    mask = None
    if visible is not None:  # additive, in q's dtype (the kernel's rule), one copy per head j
        mask = torch.zeros(n, T, dtype=q.dtype).masked_fill_(~visible, float("-inf")).repeat(g, 1)
    out, lse = flash(qf, kt, vt, attn_mask=mask)[:2]  # (1, Hkv, g*n, d), (1, Hkv, g*n)
    out = out.reshape(Hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, Hq, d)
    lse = lse.reshape(Hkv, g, n).permute(2, 0, 1).reshape(n, Hq)
    if visible is not None:  # the kernel gives a row that sees nothing lse 0
        lse = lse.masked_fill(~visible.any(1)[:, None], float("-inf"))
    return out, lse


def folded_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Partial:
    """Each group's query rows over that group's own keys, no mask.

    q: (Hkv, P, m, d); k, v: (Hkv, P, T, d). Returns out (Hkv, P, m, d), lse (Hkv, P, m) float32.
    """
    if q.device.type != "cpu":
        scores = torch.einsum("hpmd,hptd->hpmt", q.float(), k.float()) * q.shape[-1] ** -0.5
        lse = scores.logsumexp(-1)
        out = torch.einsum("hpmt,hptd->hpmd", torch.exp(scores - lse[..., None]), v.float())
        return out.to(q.dtype), lse
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse


def merge_partials(parts: list[Partial]) -> Partial:
    """Combine attentions over disjoint key sets into the attention over their union."""
    if len(parts) == 1:
        return parts[0]
    out, lse = merge_stacked(torch.stack([o.float() for o, _ in parts]), torch.stack([s for _, s in parts]))
    return out.to(parts[0][0].dtype), lse


def merge_stacked(out: torch.Tensor, lse: torch.Tensor) -> Partial:
    """`merge_partials` of parts stacked on dim 0: out (P, ..., d) float32, lse (P, ...)."""
    if out.shape[0] == 1:
        return out[0], lse[0]
    total = lse.logsumexp(dim=0)
    weights = torch.exp(lse - total).nan_to_num(0.0)  # parts with no keys -> 0
    return (weights[..., None] * out).sum(0), total
