"""Speculative decoding on tiny random models: greedy output identical to plain greedy for every
drafter (across memory eviction), rejection sampling that follows the target distribution,
and rollback that leaves the cache as if the rejected tokens were never seen."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import Sampler, SamplingParams, target_probs
from infinikv.engine.sequence import Sequence, feed
from infinikv.engine.speculative.decoder import SpeculativeDecoder
from infinikv.engine.speculative.draft_model import DraftModelDrafter
from infinikv.engine.speculative.drafter import Draft
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.engine.speculative.self_draft import SelfDrafter
from infinikv.engine.speculative.verify import accept_greedy, accept_sampled

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

PAGE = 4
GREEDY = SamplingParams(max_tokens=1)


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama", seed=11, num_hidden_layers=3, max_position_embeddings=256))


def repetitive(n: int, seed: int) -> list[int]:
    """Token ids with repeats, so lookup drafting finds matches."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 160, (12,), generator=g).tolist()
    noise = torch.randint(0, 160, (n,), generator=g).tolist()
    return [motif[i % 12] if i % 5 else noise[i] for i in range(n)]


LONG = LongContextConfig.derive(256, PAGE, resident=40, sinks=8, window=16, group=2, top_k=8, distance=32)


def greedy_run(
    model, prompt: list[int], n: int, decoder_for=None, long: LongContextConfig = LONG
) -> tuple[list[int], Sequence]:
    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=long)
    seq = Sequence(pool, long, model.cfg)
    sampler = Sampler(GREEDY)
    out = [int(sampler(feed(model, pool, seq, prompt, 16))[0])]
    decoder = decoder_for(sampler) if decoder_for is not None else None
    while len(out) < n:
        if decoder is None:
            out.append(int(sampler(feed(model, pool, seq, [out[-1]], 1))[0]))
        else:
            out += decoder.step(seq, out[-1])
    return out[:n], seq


@pytest.mark.parametrize(
    "drafter, granularity",
    [("lookup", "token"), ("self:1", "token"), ("self:2", "token"), ("model", "token"), ("lookup", "block")],
)
def test_greedy_output_is_identical_to_plain_greedy_across_eviction(model, drafter, granularity) -> None:
    long = replace(LONG, granularity=granularity, max_blocks=2)
    prompt = repetitive(30, seed=1)
    want, plain_seq = greedy_run(model, prompt, 80, long=long)

    def make(sampler):
        if drafter == "lookup":
            d = LookupDrafter()
        elif drafter == "model":
            # The target's weights as a separate draft model (its own pool, a 32-token window
            # and no memory): it agrees often, not always. A different random model agreed
            # by chance only (0 of 225 drafts once the target's sinks moved).
            d = DraftModelDrafter(model, window=32, page_size=PAGE, chunk_size=16)
        else:
            d = SelfDrafter(model, int(drafter.split(":")[1]))
        dec = SpeculativeDecoder(model, d, sampler, GREEDY, max_draft=6)
        dec._plain_s, dec._per_draft_s = 1e9, 0.0  # drafting looks free: verify on every step
        made.append(dec)
        return dec

    made: list[SpeculativeDecoder] = []
    got, seq = greedy_run(model, prompt, 80, make, long)
    assert got == want
    assert seq.table.evicted_blocks > 0 and seq.long_state is not None
    assert (
        seq.long_state.memory is not None and seq.long_state.memory.tokens == seq.table.evicted_blocks * PAGE
    )
    stats = made[0].stats
    assert stats.drafted > 0 and stats.target_forwards < 80
    if drafter != "lookup":
        assert stats.accepted > 0
    if drafter == "model":
        assert stats.accepted < stats.drafted  # rejected drafts rolled back too


def test_rollback_leaves_the_cache_as_if_the_rejected_tokens_were_never_seen(model) -> None:
    prompt = repetitive(26, seed=2)
    pool = nan_pool(model, max_tokens=300, page_size=PAGE, long_context=LONG)
    seq = Sequence(pool, LONG, model.cfg)
    feed(model, pool, seq, prompt, 16)
    last = 7
    wrong = [int(t) for t in torch.randint(0, 160, (5,), generator=torch.Generator().manual_seed(3))]

    class Fixed:
        name = "fixed"

        def propose(self, seq, last, k, params, generator):
            return Draft(wrong[:k])

        def release(self):
            pass

    dec = SpeculativeDecoder(model, Fixed(), Sampler(GREEDY), GREEDY, max_draft=5)
    dec._plain_s, dec._per_draft_s, dec._accept = 1e9, 0.0, 0.99  # draft the full 5
    out = dec.step(seq, last)
    n = len(out) - 1
    assert n < 5, "random drafts are rejected somewhere"
    assert seq.tokens == [*prompt, last, *wrong[:n]]

    ref_pool = nan_pool(model, max_tokens=300, page_size=PAGE, long_context=LONG)
    ref = Sequence(ref_pool, LONG, model.cfg)
    feed(model, ref_pool, ref, [*prompt, last, *wrong[:n]], 16)
    assert ref.table.blocks == seq.table.blocks and ref.table.length == seq.table.length
    following = [3, 1, 4, 1, 5]
    torch.testing.assert_close(
        feed(model, pool, seq, following, 5, logits="all"),
        feed(model, ref_pool, ref, following, 5, logits="all"),
        atol=1e-4,
        rtol=1e-4,
    )


def test_a_drafters_setup_is_not_charged_to_the_drafted_tokens(model, monkeypatch) -> None:
    """A draft model's first proposal prefills its window; charged to the one token of the
    probe, drafting would look dearer than a plain step and pause for 256 steps."""
    clock = [0.0]
    monkeypatch.setattr("infinikv.engine.speculative.decoder.time.perf_counter", lambda: clock[0])
    prompt = repetitive(26, seed=4)
    pool = nan_pool(model, max_tokens=300, page_size=PAGE, long_context=LONG)
    seq = Sequence(pool, LONG, model.cfg)
    feed(model, pool, seq, prompt, 16)

    class SlowStart:
        name = "slow-start"

        def propose(self, seq, last, k, params, generator):
            clock[0] += 5.0 + 0.01 * k  # a 5 s prefill, then 10 ms per drafted token
            return Draft([last] * k, setup_s=5.0)

        def release(self):
            pass

    dec = SpeculativeDecoder(model, SlowStart(), Sampler(GREEDY), GREEDY, max_draft=4)
    dec._plain_s = 0.1  # a plain step: 100 ms
    dec.step(seq, 7)  # the probe
    assert dec._per_draft_s is not None and dec._per_draft_s < dec._plain_s
    assert dec._draft_length() > 0


def test_draft_model_reports_its_window_prefill_as_setup(model) -> None:
    pool = nan_pool(model, max_tokens=300, page_size=PAGE, long_context=LONG)
    seq = Sequence(pool, LONG, model.cfg)
    prompt = repetitive(40, seed=5)
    feed(model, pool, seq, prompt, 16)
    drafter = DraftModelDrafter(model, window=32, page_size=PAGE)
    first = drafter.propose(seq, 7, 2, GREEDY, None)  # prefills its 32-token window
    feed(model, pool, seq, [7], 1)
    second = drafter.propose(seq, 9, 2, GREEDY, None)  # one token since: no setup
    assert first.setup_s > 0.0 and second.setup_s == 0.0


def test_accept_greedy_takes_the_matching_prefix_then_the_target_token() -> None:
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 5, 1, 3]):
        logits[row, best] = 1.0
    assert accept_greedy(logits, [2, 5, 0]) == (2, 1)
    assert accept_greedy(logits, [2, 5, 1]) == (3, 3)
    assert accept_greedy(logits, [4, 5, 1]) == (0, 2)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at the 0.001 level over the bins expected to hold >= 5 draws (the tail
    merged into one bin); the critical value by the Wilson-Hilferty approximation."""
    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    crit = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
    return chi2 < crit


@pytest.mark.parametrize("drafter", ["distribution", "point mass"])
def test_rejection_sampling_reproduces_the_target_distribution(drafter) -> None:
    g = torch.Generator().manual_seed(0)
    V = 8
    logits = torch.randn(3, V, generator=g) * 1.5  # target at 3 positions (k = 2 drafts)
    q = torch.softmax(torch.randn(2, V, generator=g), -1)
    params = SamplingParams(temperature=1.0)
    p = target_probs(logits, params)
    counts = torch.zeros(V)
    second = torch.zeros(V)
    draws = 20_000
    for _ in range(draws):
        if drafter == "distribution":
            d0 = int(torch.multinomial(q[0], 1, generator=g))
            d1 = int(torch.multinomial(q[1], 1, generator=g))
            n, bonus = accept_sampled(logits, [d0, d1], q, params, g)
        else:
            d0, d1 = 3, 3  # a deterministic drafter always proposes the same token
            n, bonus = accept_sampled(logits, [d0, d1], None, params, g)
        first = d0 if n >= 1 else bonus
        counts[first] += 1
        if first == d0 and n >= 1 and d0 == 3:  # the second position given a fixed first token
            second[d1 if n >= 2 else bonus] += 1
    assert chi_square_ok(counts, p[0])
    if drafter == "point mass":
        assert chi_square_ok(second, p[1])


def test_speculative_sampling_on_a_tiny_model_follows_the_target(model) -> None:
    """First token of a speculative step from a fixed state, over many seeded draws: distributed
    as the target's next-token distribution (self-draft proposes, the target verifies)."""
    params = SamplingParams(temperature=1.0, seed=0)
    prompt = repetitive(20, seed=4)
    pool = nan_pool(model, max_tokens=200, page_size=PAGE)
    seq = Sequence(pool, None, model.cfg)
    feed(model, pool, seq, prompt, 16)
    start = len(seq)
    target = target_probs(feed(model, pool, seq, [9], 1), params)[0]
    seq.truncate(start)
    sampler = Sampler(params)
    dec = SpeculativeDecoder(model, SelfDrafter(model, 1), sampler, params, max_draft=3)
    counts = torch.zeros(target.shape[0])
    for _ in range(3000):
        dec._plain_s, dec._per_draft_s, dec._accept = 1e9, 0.0, 0.99
        counts[dec.step(seq, 9)[0]] += 1
        seq.truncate(start)
    assert dec.stats.drafted > 0 and 0 < dec.stats.accepted < dec.stats.drafted
    assert chi_square_ok(counts, target)


def test_lookup_drafts_the_continuation_of_the_latest_match() -> None:
    pool = nan_pool(ours_from_hf(tiny_hf_model("llama", seed=0)), max_tokens=64, page_size=PAGE)
    seq = Sequence(pool)
    seq.tokens = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 3, 4, 5, 6]
    d = LookupDrafter()
    assert d.propose(seq, 7, 3, GREEDY, None).tokens == [3, 4, 5]  # "5 6 7" -> latest: "3 4 5"
    assert d.propose(seq, 99, 3, GREEDY, None).tokens == []
