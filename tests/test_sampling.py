"""Sampling: parameter validation, top-k/top-p masks, seeded reproducibility, distribution."""

from __future__ import annotations

import math

import pytest
import torch

from infinikv.engine.sampling import Sampler, SamplingParams, filter_logits, steer_, target_probs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_params_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    out = filter_logits(logits, top_k=3, top_p=1.0)
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [1, 3, 5]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, 0, p)).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.5) == [1]
    assert kept(0.8) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [1, 2, 3]
    assert kept(0.01) == [1]  # the most likely token always survives
    assert kept(1.0) == [0, 1, 2, 3]


def test_top_k_and_top_p_compose_per_row() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    out = filter_logits(logits, top_k=2, top_p=0.6)
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    assert torch.isfinite(out[1]).sum() == 2  # top-k leaves two ties; 0.5 < 0.6 needs both


def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler(SamplingParams())(logits), logits.argmax(-1))


def test_a_vanishing_temperature_samples_the_argmax() -> None:
    """Found by the service fuzz test: temperature ~1e-76 made every logit +-inf (NaN probs)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 10
    for temperature in (1e-76, 1e-30, 1e-6):
        params = SamplingParams(temperature=temperature, seed=0)
        probs = target_probs(logits, params)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
        assert torch.equal(Sampler(params)(logits), logits.argmax(-1))


def test_a_vanishing_top_p_samples_the_argmax() -> None:
    """Found by the service fuzz test: top_p 5e-117 rounds to 0 in float32, which dropped
    every token (NaN probabilities, a 500)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    for top_p in (5e-117, 1e-45, 1e-6):
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
        probs = target_probs(logits, params)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
        assert torch.equal(Sampler(params)(logits), logits.argmax(-1))


def test_seeded_runs_reproduce_and_seeds_differ() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    draws = lambda p: [int(s(logits)) for s in [Sampler(p)] for _ in range(40)]  # noqa: E731
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=1.0, seed=8))


def test_sampling_follows_the_target_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=0)
    want = target_probs(logits, params)[0]
    sampler = Sampler(params)
    n = 6000
    counts = torch.bincount(torch.cat([sampler(logits.expand(n, -1))]), minlength=6).float()
    # Chi-square over the tokens that have mass; 5 dof -> 20.5 is the 0.001 tail.
    mask = want > 0
    expected = want[mask] * n
    chi2 = (((counts[mask] - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.5, (counts, expected)
    assert counts[~mask].sum() == 0  # filtered tokens are never drawn
    assert math.isclose(want.sum().item(), 1.0, rel_tol=1e-5)


def test_logit_bias_and_penalties_shift_the_logits_they_name() -> None:
    params = SamplingParams(logit_bias=((3, 5.0), (1, -2.0)), presence_penalty=0.5, frequency_penalty=1.0)
    assert params.steers and not SamplingParams().steers
    logits = steer_(torch.zeros(1, 6), params, {3: 2, 4: 1})
    # token 3: +5 bias, then twice generated: -(2 * 1.0 + 0.5); token 4 once: -(1.0 + 0.5)
    assert logits.tolist() == [[0.0, -2.0, 0.0, 2.5, -1.5, 0.0]]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=-3)
