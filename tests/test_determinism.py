"""Real model, real text: the same greedy request gives the same tokens every time, with or
without a drafter, alone or with another sequence's forwards between its own (as the engine's
worker interleaves requests), through the CPU kernels and an evicting memory."""

from __future__ import annotations

import pytest

from infinikv.engine.generator import Generator
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.evaluation.haystack import HaystackMissing
from infinikv.evaluation.recall import recall_case

pytestmark = pytest.mark.slow

TOKENS = 3000  # a prompt well past the 1024-token resident window below
PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


def generator(model, drafter_factory=None) -> Generator:
    config = LongContextConfig.derive(8192, 16, resident=1024, window=256, group=4)
    return Generator(model, 8192, long_context=config, slots=2, drafter_factory=drafter_factory)


@pytest.fixture(scope="module")
def prompts(default_model) -> list[list[int]]:
    try:
        return [recall_case(default_model.tokenizer, "chat", TOKENS, "tune", i, 2).prompt for i in range(2)]
    except HaystackMissing as e:
        pytest.skip(str(e))


def test_greedy_output_is_the_same_every_time(cpu_kernels, prompts) -> None:
    gen = generator(cpu_kernels)
    alone = gen.generate(prompts[0], PARAMS).token_ids
    assert gen.generate(prompts[0], PARAMS).token_ids == alone
    drafted = generator(cpu_kernels, LookupDrafter).generate(prompts[0], PARAMS)
    assert drafted.speculation is not None and drafted.speculation["drafted"] > 0
    assert drafted.token_ids == alone
    # Beside another request: the two sequences' prefill chunks and decode steps alternate in
    # one pool, as the engine's worker runs its tasks.
    seqs = [gen.new_sequence(f"ikv:test:{i}:") for i in range(2)]
    runs = [gen.run(seq, prompt, PARAMS) for seq, prompt in zip(seqs, prompts, strict=True)]
    tokens: list[list[int]] = [[], []]
    live = [0, 1]
    while live:
        for i in list(live):
            event = next(runs[i], None)
            if event is None:
                live.remove(i)
            elif event.token_id is not None:
                tokens[i].append(event.token_id)
    for seq in seqs:
        seq.release()
    assert tokens[0] == alone
    assert tokens[1] == gen.generate(prompts[1], PARAMS).token_ids
