"""Real model, real text: the same greedy request gives the same tokens every time, with or
without a drafter, alone or batched with another sequence in the engine, through the CPU
kernels and an evicting memory."""

from __future__ import annotations

import pytest
import torch

from infinikv.engine.batch import PIECE, Forward, Prompt, forward_alone, run_alone, run_round
from infinikv.engine.generator import Generator
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.sequence import feed
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.engine.tasks import TaskHandle
from infinikv.evaluation.haystack import HaystackMissing, bible_text
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


def test_follow_up_turns_in_pieces_equal_their_runs_alone(cpu_kernels) -> None:
    """Short prompts after a history of 600-900 tokens (where the attention kernel splits
    the keys between threads) run in pieces that share forwards with the others' decode
    tokens, and each gives its tokens alone."""
    try:
        text = bible_text()
    except HaystackMissing as e:
        pytest.skip(str(e))
    gen = Generator(cpu_kernels, 4096, slots=4)
    encode = cpu_kernels.tokenizer
    histories = [encode(text[i * 5000 : i * 5000 + 600 + 100 * i * 4])["input_ids"] for i in range(4)]
    question = "\n\nWho is named first in the passage above, and what did he do?"
    prompts = [encode(question * (1 + i % 2))["input_ids"] for i in range(4)]  # 15-30 tokens
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    alone = []
    for history, prompt in zip(histories, prompts, strict=True):
        seq = gen.new_sequence("ikv:test:alone:")
        try:
            feed(gen.model, gen.pool, seq, history, gen.chunk_size, "none")
            assert gen.in_pieces(seq, prompt)
            steps = run_alone(gen.model, gen.pool, gen.run(seq, prompt, params))
            alone.append([e.token_id for e in steps if e.token_id is not None])
        finally:
            seq.release()
    shapes: list[tuple[int, int]] = []

    class Shapes:
        def step(self, seconds: float, retrieval_seconds: float, sequences: int, tokens: int) -> None:
            shapes.append((sequences, tokens))

        def waited(self, seconds: float) -> None:
            pass

    engine = Engine(gen, InProcessBlockStore(), observer=Shapes(), step_tokens=512)
    engine.start()
    try:
        handles = [
            engine.submit(generation_task(p, params, h), TaskHandle(), needs_sequence=True)
            for h, p in zip(histories, prompts, strict=True)
        ]
        got = [task_result(h) for h in handles]
    finally:
        engine.stop()
    assert got == alone
    assert any(1 < n < rows for n, rows in shapes), "prompt pieces ran beside decode tokens"


@pytest.mark.parametrize("weights", ["cpu_kernels", "bf16_model"], ids=["f32", "bf16"])
def test_prompt_pieces_give_the_same_logits_and_keys_in_any_company(request, weights) -> None:
    """Bit for bit, float32 and bfloat16 weights: a prompt of one token under the invariant
    rows after a 700-token history, run alone (one forward) and in two rounds beside two
    decode tokens (the pieces that fit the room of the first round's forward, the rest in the
    second's), gives the same logits and keys."""
    try:
        text = bible_text()
    except HaystackMissing as e:
        pytest.skip(str(e))
    gen = Generator(request.getfixturevalue(weights), 4096, slots=3)
    model, pool = gen.model, gen.pool
    rows = model.invariant_rows
    seqs = [gen.new_sequence(f"ikv:test:{i}:") for i in range(3)]
    try:
        for i, seq in enumerate(seqs):
            feed(model, pool, seq, gen.encode(text[i * 9000 : i * 9000 + 3000])[:700], gen.chunk_size, "none")
        prompt = tuple(gen.encode(text[40000:41000])[: rows - 1])
        start, first = len(seqs[0]), (rows - 2) // PIECE * PIECE
        assert gen.in_pieces(seqs[0], list(prompt))
        alone = forward_alone(model, pool, Prompt(seqs[0], prompt))
        keys = pool.k[:, seqs[0].table.pages].clone()
        seqs[0].truncate(start)
        replies, lengths = [], []
        for rest in (prompt, prompt[first:]):
            requests = [Forward(seqs[1], 7), Prompt(seqs[0], rest), Forward(seqs[2], 9)]
            replies.append(run_round(model, pool, requests, sequences=3, budget=0)[1])
            lengths.append(len(seqs[0]) - start)
        assert replies[0] is None and lengths == [first, len(prompt)]
        assert torch.equal(replies[1], alone)
        assert torch.equal(pool.k[:, seqs[0].table.pages], keys)
    finally:
        for seq in seqs:
            seq.release()
