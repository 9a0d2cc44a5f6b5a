"""Partial attentions and the LSE merge against one plain softmax over all keys."""

from __future__ import annotations

import pytest
import torch

from infinikv.attention.pytorch import attend
from infinikv.core.partial import flash_partial, merge_partials, reference_partial


def qkv(n: int, T: int, Hq: int, Hkv: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, Hq, d, generator=g),
        torch.randn(T, Hkv, d, generator=g),
        torch.randn(T, Hkv, d, generator=g),
    )


def softmax_attention(q, k, v, visible=None):
    """The oracle: repeat kv heads, one softmax per query head."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (T, Hq, d)
    scores = torch.einsum("nhd,thd->hnt", q, kr) / q.shape[-1] ** 0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), vr)


@pytest.mark.parametrize("n,T,Hq,Hkv,d", [(5, 63, 4, 2, 60), (1, 17, 6, 1, 64), (33, 70, 4, 4, 16)])
def test_merge_of_splits_equals_one_softmax(n, T, Hq, Hkv, d) -> None:
    q, k, v = qkv(n, T, Hq, Hkv, d)
    cuts = [0, 7, T // 2, T]
    parts = [reference_partial(q, k[a:b], v[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    out, _ = merge_partials(parts)
    torch.testing.assert_close(out, softmax_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_fully_masked_part_drops_out_of_the_merge() -> None:
    q, k, v = qkv(3, 20, 4, 2, 8)
    empty = reference_partial(q, k[:5], v[:5], torch.zeros(3, 5, dtype=torch.bool))
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    out, _ = merge_partials([empty, reference_partial(q, k[5:], v[5:])])
    torch.testing.assert_close(out, softmax_attention(q, k[5:], v[5:]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv,d", [(9, 3, 64), (4, 4, 128), (8, 1, 60)])
def test_flash_partial_matches_reference(causal, Hq, Hkv, d) -> None:
    n = 37
    q, k, v = qkv(n, n if causal else 63, Hq, Hkv, d, seed=1)
    visible = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
    out, lse = flash_partial(q, k, v, causal)
    ref_out, ref_lse = reference_partial(q, k, v, visible)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,d", [(9, 3, 64), (4, 4, 128), (8, 1, 60)])
def test_masked_flash_partial_matches_reference(Hq, Hkv, d) -> None:
    """A band's mask: some rows see a few keys, one row sees none (lse -inf, zero output)."""
    n, T = 37, 45
    q, k, v = qkv(n, T, Hq, Hkv, d, seed=2)
    rel = torch.arange(n)[:, None] - torch.arange(T)[None, :] + 20
    visible = (rel >= 0) & (rel < 30)
    visible[5] = False
    out, lse = flash_partial(q, k, v, False, visible)
    ref_out, ref_lse = reference_partial(q, k, v, visible)
    assert torch.isinf(lse[5]).all() and (out[5] == 0).all()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 40])  # bmm decode path, bmm masked path, flash split path
def test_attend_equals_causal_softmax(n) -> None:
    T = 71
    q, k, v = qkv(n, T, 9, 3, 64, seed=2)
    positions = torch.arange(T - n, T)
    visible = torch.arange(T)[None, :] <= positions[:, None]
    torch.testing.assert_close(
        attend(q, k, v, positions), softmax_attention(q, k, v, visible), atol=2e-5, rtol=1e-4
    )


def test_attend_refuses_queries_that_are_not_the_last_tokens() -> None:
    q, k, v = qkv(2, 10, 2, 1, 8)
    with pytest.raises(ValueError, match="last 2 of 10"):
        attend(q, k, v, torch.tensor([3, 4]))
