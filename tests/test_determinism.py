"""Real model, real text: the same greedy request gives the same tokens every time, with or
without a drafter, alone or batched with another sequence in the engine, through the CPU
kernels and an evicting memory."""

from __future__ import annotations

import pytest

from infinikv.engine.generator import Generator
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.engine.tasks import TaskHandle
from infinikv.evaluation.haystack import HaystackMissing
from infinikv.evaluation.recall import recall_case
from infinikv.memory.store import InProcessBlockStore

from .conftest import generation_task, task_result

pytestmark = pytest.mark.slow

TOKENS = 2000  # a prompt well past the 1024-token resident window below
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
    # Beside another request, in the engine: their prefill chunks take turns and their
    # decode steps run in one batched forward.
    engine = Engine(gen, InProcessBlockStore())
    engine.start()
    try:
        handles = [
            engine.submit(generation_task(p, PARAMS), TaskHandle(), needs_sequence=True) for p in prompts
        ]
        tokens = [task_result(h) for h in handles]
    finally:
        engine.stop()
    assert tokens[0] == alone
    assert tokens[1] == gen.generate(prompts[1], PARAMS).token_ids
