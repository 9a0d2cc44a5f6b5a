"""Real model: 200 greedy tokens with each drafter are identical to plain greedy decoding, with
a 512-token resident window so blocks are evicted into memory while it generates."""

from __future__ import annotations

import pytest

from infinikv.engine.generator import Generator
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.speculative.draft_model import DraftModelDrafter, check_same_vocabulary
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.engine.speculative.self_draft import SelfDrafter
from infinikv.model.loader import load_model

from .conftest import CACHE_DIR

pytestmark = pytest.mark.slow

PASSAGE = (
    "The lighthouse stood on a rock at the edge of the bay. Every night the keeper climbed the "
    "ninety-nine steps, lit the lamp, and wrote the hour in his log. Ships passed in the dark, "
    "and the keeper counted them: one, two, three, four, five ships before midnight. "
)


def generate(default_model, drafter_factory=None):
    cfg = LongContextConfig.derive(8192, 16, resident=512, window=128, group=4)
    gen = Generator(default_model, 8192, long_context=cfg, drafter_factory=drafter_factory, max_draft=6)
    prompt = gen.encode(PASSAGE * 6 + "\nThe keeper's log, copied word for word:\n" + PASSAGE[:60])
    assert 350 < len(prompt) < 512 - 16
    return gen.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True)), len(prompt)


@pytest.fixture(scope="module")
def plain(default_model):
    return generate(default_model)[0]


@pytest.mark.parametrize("drafter", ["lookup", "self:8", "model"])
def test_two_hundred_greedy_tokens_identical_to_plain(default_model, plain, drafter) -> None:
    if drafter == "lookup":
        factory = LookupDrafter
    elif drafter == "model":
        small = load_model(None, CACHE_DIR, quantize="int4")  # the default model drafts for itself
        check_same_vocabulary(small, default_model)
        factory = lambda: DraftModelDrafter(small.model)  # noqa: E731
    else:
        factory = lambda: SelfDrafter(default_model.model, 8)  # noqa: E731
    got, prompt_len = generate(default_model, factory)
    assert prompt_len + 200 > 512 + 16  # generation crossed an eviction
    assert got.token_ids == plain.token_ids
    stats = got.speculation
    assert stats is not None and stats["drafted"] > 0
    if drafter != "self:8":  # the first 8 of 30 layers rarely agree with all 30 (it pauses itself)
        assert stats["accepted"] > 0
