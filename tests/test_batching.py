"""Decode steps of several sequences in one forward (engine/batch.py, the worker's rounds):
each sequence's greedy tokens equal its tokens alone, plain and long-context (evicting,
retrieving from memory while batched), float32 and bfloat16 KV pages, with mixed prompt
lengths and sequences joining and leaving mid-batch; seeded sampling likewise; one
sequence's error fails it alone."""

from __future__ import annotations

import pytest
import torch

from infinikv.engine.batch import PIECE, Forward, Prompt, forward_alone, pack, run_round
from infinikv.engine.requests import Turn, submit_turn
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.engine.tasks import TaskHandle
from infinikv.memory.store import InProcessBlockStore

from .conftest import generation_task, random_ids, task_result, tiny_generator


class Recorder:
    """The engine's observer: how many sequences and rows each forward held."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.rows: list[int] = []

    def step(self, seconds: float, retrieval_seconds: float, sequences: int, tokens: int) -> None:
        self.sizes.append(sequences)
        self.rows.append(tokens)

    def waited(self, seconds: float) -> None:
        pass


@pytest.mark.parametrize("long", [False, True], ids=["plain", "long-context"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16], ids=["kv-model", "kv-bf16"])
def test_batched_sequences_match_their_runs_alone(kernel_tiny, long, sampled, kv_dtype) -> None:
    gen = tiny_generator(kernel_tiny, long, kv_dtype=kv_dtype)
    # Prompts of mixed lengths (long-context ones past the 32-token resident window, so
    # blocks leave for the memory during prefill and while batched); different lengths of
    # output, so sequences leave the batch at different times.
    prompts = [random_ids(n, seed) for seed, n in enumerate((9, 70, 37, 120))]
    params = [
        SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.9 if sampled else 0.0, seed=11 + i)
        for i, m in enumerate((30, 12, 40, 25))
    ]
    alone = [gen.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]

    recorder = Recorder()
    engine = Engine(gen, InProcessBlockStore(), observer=recorder)
    engine.start()
    try:
        first = engine.submit(generation_task(prompts[0], params[0]), TaskHandle(), needs_sequence=True)
        first.next_blocking(timeout=120)  # running before the others join
        rest = [
            engine.submit(generation_task(p, sp), TaskHandle(), needs_sequence=True)
            for p, sp in zip(prompts[1:], params[1:], strict=True)
        ]
        got = [task_result(first), *(task_result(h) for h in rest)]
    finally:
        engine.stop()
    assert got == alone
    if kernel_tiny.model.invariant_rows > 1:
        assert max(recorder.sizes) > 1, "the decode steps ran batched"
    else:  # the PyTorch path is not row-count invariant: it runs decode steps one by one
        assert max(recorder.sizes) == 1


def test_speculative_sequences_join_the_batch_in_company_and_stay_exact(kernel_tiny) -> None:
    """Alone (in the engine too), a sequence with a drafter verifies drafts; beside others it
    decodes in their batch instead. Greedy output is the same either way."""
    gen = tiny_generator(kernel_tiny, long=True, drafter_factory=LookupDrafter)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [random_ids(8, seed) * 4 for seed in range(3)]  # repeats, so lookup finds drafts
    alone = [gen.generate(p, params) for p in prompts]
    assert any(a.speculation and a.speculation["drafted"] for a in alone)
    recorder = Recorder()
    engine = Engine(gen, InProcessBlockStore(), observer=recorder)
    engine.start()
    try:
        lone = task_result(submit_turn(engine, Turn(params, token_ids=prompts[0]), TaskHandle()))
        handles = [
            engine.submit(generation_task(p, params), TaskHandle(), needs_sequence=True) for p in prompts
        ]
        got = [task_result(h) for h in handles]
    finally:
        engine.stop()
    assert lone.token_ids == alone[0].token_ids and lone.speculation and lone.speculation["drafted"] > 0
    assert got == [a.token_ids for a in alone]
    if kernel_tiny.model.invariant_rows > 1:
        assert max(recorder.sizes) > 1


def test_a_failing_sequence_fails_alone_and_the_batch_goes_on(kernel_tiny) -> None:
    gen = tiny_generator(kernel_tiny, long=True)
    seqs = [gen.new_sequence(f"ikv:test:{i}:") for i in range(3)]
    try:
        for i, seq in enumerate(seqs):
            forward_alone(gen.model, gen.pool, Forward(seq, random_ids(1, i)[0]))
        lengths = [len(s) for s in seqs]
        expected = []
        for seq in (seqs[0], seqs[2]):
            expected.append(forward_alone(gen.model, gen.pool, Forward(seq, 5)))
            seq.truncate(len(seq) - 1)
        # A token outside the vocabulary: the batch's forward fails, each runs again alone.
        requests = [Forward(seqs[0], 5), Forward(seqs[1], 10**6), Forward(seqs[2], 5)]
        replies = run_round(gen.model, gen.pool, requests, sequences=3, budget=0)
        assert isinstance(replies[1], IndexError)
        assert torch.equal(replies[0], expected[0]) and torch.equal(replies[2], expected[1])
        assert [len(s) for s in seqs] == [lengths[0] + 1, lengths[1], lengths[2] + 1]
    finally:
        for seq in seqs:
            seq.release()


def test_a_failing_prompt_fails_alone_and_runs_no_further_piece(kernel_tiny) -> None:
    """A prompt with a token outside the vocabulary, beside a decode token: the shared forward
    is undone, the decode token gets its logits alone, the prompt its error with its sequence
    as it was. Alone over two forwards, a prompt that fails in the first runs no second."""
    gen = tiny_generator(kernel_tiny, long=False)
    rows = gen.model.invariant_rows
    if rows < PIECE:
        pytest.skip("prompts run in pieces only through the few-row kernels")
    seqs = [gen.new_sequence(f"ikv:test:{i}:") for i in range(2)]
    try:
        for i, seq in enumerate(seqs):
            forward_alone(gen.model, gen.pool, Forward(seq, random_ids(1, i)[0]))
        expected = forward_alone(gen.model, gen.pool, Forward(seqs[0], 5))
        seqs[0].truncate(1)
        bad = Prompt(seqs[1], (*random_ids(12, 3), 10**6, *random_ids(7, 4)))
        replies = run_round(gen.model, gen.pool, [Forward(seqs[0], 5), bad], sequences=2, budget=0)
        assert torch.equal(replies[0], expected) and isinstance(replies[1], IndexError)
        assert [len(s) for s in seqs] == [2, 1]
        # its first forward holds the bad token, its second would hold the rest
        long = Prompt(seqs[1], (*random_ids(rows - 1, 5), 10**6, *random_ids(5, 6)))
        forwards: list[int] = []
        (reply,) = run_round(
            gen.model,
            gen.pool,
            [long],
            sequences=1,
            budget=rows + 6,
            observe=lambda parts, seconds, n: forwards.append(n),
        )
        assert isinstance(reply, IndexError) and len(seqs[1]) == 1
        assert len(forwards) == 1  # the failed forward; no second one
    finally:
        for seq in seqs:
            seq.release()


def test_an_engine_task_that_fails_in_the_batch_fails_only_its_request(kernel_tiny) -> None:
    gen = tiny_generator(kernel_tiny, long=False)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = [random_ids(12, 1), random_ids(20, 2)]
    alone = [gen.generate(p, params).token_ids for p in prompts]

    def broken(engine: Engine, task):
        seq = task.seq = engine.generator.new_sequence("ikv:test:broken:")
        try:
            engine.generator.model(seq.extend_batch(random_ids(5, 3)), engine.generator.pool)
            for _ in range(3):
                yield Forward(seq, 1)
            yield Forward(seq, 10**6)  # out of the vocabulary
            return "unreachable"
        finally:
            seq.release()

    engine = Engine(gen, InProcessBlockStore())
    engine.start()
    try:
        good = [engine.submit(generation_task(p, params), TaskHandle(), needs_sequence=True) for p in prompts]
        bad = engine.submit(broken, TaskHandle(), needs_sequence=True)
        assert [task_result(h) for h in good] == alone
        with pytest.raises(IndexError):
            task_result(bad)
    finally:
        engine.stop()


def test_short_prompts_run_in_pieces_in_the_room_decode_tokens_leave(kernel_tiny) -> None:
    """Four 10-token prompts queued together under a 24-row budget: the first round runs two
    of them in one forward of pieces (8 + 2 rows each; the third's first piece is over the
    budget); the next round's forward holds those two's decode tokens and the other two
    prompts in the room they leave, which no budget bounds. Each output equals its output
    alone. Without the few-row kernels (the PyTorch path) prompts run in forwards of their
    own, up to the budget's rows a round, and decode tokens one per forward."""
    gen = tiny_generator(kernel_tiny, long=False)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = [random_ids(10, seed) for seed in range(4)]
    recorder = Recorder()
    engine = Engine(gen, InProcessBlockStore(), observer=recorder, step_tokens=24)
    handles = [engine.submit(generation_task(p, params), TaskHandle(), needs_sequence=True) for p in prompts]
    engine.start()  # all four are queued before the first round
    try:
        got = [task_result(h) for h in handles]
    finally:
        engine.stop()
    assert got == [gen.generate(p, params).token_ids for p in prompts]
    if kernel_tiny.model.invariant_rows > 1:
        assert recorder.sizes[:3] == [2, 4, 4]
        assert recorder.rows[:3] == [20, 2 + 20, 4]
    else:
        assert recorder.sizes[:4] == [1, 1, 1, 1]
        assert recorder.rows[:3] == [10, 10, 10]


def test_prompt_pieces_pack_in_order_within_the_limits() -> None:
    """`pack`: decode tokens first, a forward of at most `rows` rows and `sequences`
    sequences; a prompt's pieces in order, never in a forward before its previous piece's;
    forwards without decode tokens only up to the budget."""
    seq = object()
    decodes = [Forward(seq, i) for i in range(5)]  # type: ignore[arg-type]
    long, short = (
        Prompt(
            seq,
            tuple(range(20)),
        ),
        Prompt(seq, tuple(range(3))),
    )  # type: ignore[arg-type]
    groups = pack([*decodes, long, short], rows=16, sequences=3, budget=8)
    assert [[(p.request, p.rows, p.ends) for p in g] for g in groups] == [
        [(decodes[0], 1, True), (decodes[1], 1, True), (decodes[2], 1, True)],
        [(decodes[3], 1, True), (decodes[4], 1, True), (long, 8, False)],
        [(short, 3, True)],  # the long prompt's second piece would need a forward of its own
    ]
    groups = pack([long, short], rows=16, sequences=3, budget=24)
    assert [[(p.request, [len(x) for x in p.pieces]) for p in g] for g in groups] == [
        [(long, [8, 8])],
        [(long, [4]), (short, [3])],  # the budget is spent: 8 + 8 + 4 + 3 rows
    ]
    assert pack([short], rows=16, sequences=3, budget=2) == []
