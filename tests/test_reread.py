"""Re-reading (engine/reread.py): an answer past the resident window is generated over the
history's head, the passages its last prompt position attended to most, and its tail.
Oracles: the plain model over the re-read prompt built from an independent tally; the
sequence's history afterwards; the pool's pages; the real model on real text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from infinikv.engine.batch import run_alone
from infinikv.engine.generator import TICK, Generator
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.reread import WINDOW_TOKENS, Reread
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import feed
from infinikv.evaluation.haystack import HaystackMissing
from infinikv.evaluation.recall import recall_case
from infinikv.memory.store import InProcessBlockStore
from infinikv.model.loader import LoadedModel

from .conftest import ours_from_hf, tiny_hf_model

PAGE = 4
VOCAB = 160
CHUNK = 16


def test_passages_are_the_top_windows_widened_joined_and_in_order() -> None:
    reread = Reread(passages=3, margin=4, head=8, tail=10)
    n = 400
    shares = torch.zeros(n, dtype=torch.float64)
    shares[300:310] = 0.05  # the most
    shares[100:104] = 0.02
    shares[110] = 0.01  # its window overlaps the previous one's widened span: joined
    shares[2] = shares[395] = 1.0  # in the head and the tail: kept anyway, never picked
    history = list(range(n))
    spans = reread.spans(shares, history, frozenset())
    assert spans[-1][0] <= 300 and spans[-1][1] >= 310 and spans[-1][1] - spans[-1][0] == WINDOW_TOKENS + 8
    assert len(spans) == 2 and spans[0][0] <= 100 and spans[0][1] >= 111
    assert all(8 <= a < b <= n - 10 for a, b in spans)
    sep = [-1]
    prompt = reread.prompt(shares, history, sep, frozenset())
    pieces = [history[:8]] + [history[a:b] for a, b in spans] + [history[-10:]]
    assert prompt == [t for i, piece in enumerate(pieces) for t in ([] if i == 0 else sep) + piece]
    # Head and tail are all of it; no attention: no passage.
    assert reread.prompt(shares, history[:18], sep, frozenset()) == history[:18]
    assert reread.spans(torch.zeros(n, dtype=torch.float64), history, frozenset()) == []


def three_passages() -> tuple[Reread, torch.Tensor, list[int]]:
    """A re-read of 3 passages over 400 tokens with windows of shares 0.05, 0.01, 0.03 in order."""
    shares = torch.zeros(400, dtype=torch.float64)
    shares[100:110], shares[200:210], shares[300:310] = 0.05, 0.01, 0.03
    return Reread(passages=3, margin=4, head=8, tail=10), shares, list(range(400))


def test_passages_best_last_put_the_most_attended_next_to_the_question() -> None:
    reread, shares, history = three_passages()
    by_place = reread.spans(shares, history, frozenset())
    by_share = dataclasses.replace(reread, order="best-last").spans(shares, history, frozenset())
    assert [a for a, _ in by_place] == sorted(a for a, _ in by_place)
    assert by_share == [by_place[1], by_place[2], by_place[0]]


def test_passages_top_last_or_twice_keep_the_others_by_position() -> None:
    reread, shares, history = three_passages()
    shares[200:210], shares[300:310] = 0.03, 0.01  # best-last would give 300, 200, 100
    by_place = reread.spans(shares, history, frozenset())
    moved = dataclasses.replace(reread, order="top-last").spans(shares, history, frozenset())
    twice = dataclasses.replace(reread, order="top-twice").spans(shares, history, frozenset())
    assert moved == [by_place[1], by_place[2], by_place[0]]
    assert twice == [*by_place, by_place[0]]
    with pytest.raises(ValueError, match="order='best-first': one of position"):
        dataclasses.replace(reread, order="best-first")


def test_passages_under_the_floor_are_left_out() -> None:
    reread, shares, history = three_passages()
    every = reread.spans(shares, history, frozenset())
    assert dataclasses.replace(reread, floor=0.5).spans(shares, history, frozenset()) == [every[0], every[2]]
    assert dataclasses.replace(reread, floor=1.0).spans(shares, history, frozenset()) == [every[0]]


def test_passages_grow_to_whole_lines_within_reach() -> None:
    reread = Reread(passages=1, margin=4, head=8, tail=10, reach=20)
    n, eol = 400, -2
    shares = torch.zeros(n, dtype=torch.float64)
    shares[200:210] = 1.0
    history = list(range(n))
    ((a, b),) = reread.spans(shares, history, frozenset())
    for at in (a - 15, b + 30):  # a line starts 14 tokens before the passage; the next ends 31 after it
        history[at] = eol
    assert reread.spans(shares, history, frozenset({eol})) == [(a - 14, b)]  # the far end stays
    history[b + 5] = eol
    assert reread.spans(shares, history, frozenset({eol})) == [(a - 14, b + 6)]  # the line's break included
    history[a - 1] = history[b - 1] = eol
    assert reread.spans(shares, history, frozenset({eol})) == [(a, b)]  # whole lines already


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LoadedModel:
    """A random model with the default tokenizer (its first 2048 ids, the separator's among them)."""
    model = ours_from_hf(tiny_hf_model("llama", seed=9, max_position_embeddings=256, vocab_size=2048))
    return LoadedModel(model, tokenizer, model.cfg, Path("tiny"), frozenset())


def generator(loaded: LoadedModel, reread: int) -> Generator:
    cfg = LongContextConfig.derive(
        256, PAGE, resident=128, sinks=8, window=100, group=1, reread=reread, reread_margin=2, reread_tail=8
    )
    return Generator(
        loaded,
        256,
        page_size=PAGE,
        chunk_size=CHUNK,
        fill_value=float("nan"),  # a read of an unwritten slot would show up
        long_context=cfg,
        store=InProcessBlockStore(),
    )


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_answer_is_the_plain_model_over_the_reread_prompt(tiny) -> None:
    gen = generator(tiny, reread=2)
    prompt = ids(230, seed=1)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    got = gen.generate(prompt, params).token_ids

    # The same prefill, chunk by chunk, its last chunk tallied, then the plain model.
    seq = gen.new_sequence("oracle:")
    for start in range(0, len(prompt), CHUNK):
        if start + CHUNK >= len(prompt):
            seq.tally = tally = Reread.tally(tiny.config.num_layers)
        feed(gen.model, gen.pool, seq, prompt[start : start + CHUNK], CHUNK, "none")
    assert seq.table.evicted_blocks > 0
    reread = gen.long_context.rereader.prompt(tally.shares(), seq.tokens, gen.separator, gen.line_breaks)
    seq.release()
    assert 8 + 8 < len(reread) < 128  # head, tail, two passages: nothing of it evicted
    plain = Generator(tiny, 256, page_size=PAGE, chunk_size=CHUNK, fill_value=float("nan"))
    assert got == plain.generate(reread, params).token_ids
    # Inside the resident window nothing is re-read: the sequence's own attention answers.
    short = ids(100, seed=2)
    assert (
        gen.generate(short, params).token_ids == generator(tiny, reread=0).generate(short, params).token_ids
    )


def test_the_history_goes_on_from_the_answer_and_no_page_is_left_behind(tiny) -> None:
    gen = generator(tiny, reread=2)
    assert gen.prefix_cache is not None
    cache = gen.prefix_cache

    def unheld() -> int:
        """Free pages and the prefix cache's (once the sequences let go: every page they held)."""
        return gen.pool.num_free + len(cache)

    free = unheld()
    prompt = ids(230, seed=3)
    seq = gen.new_sequence("s:")
    events = list(
        run_alone(gen.model, gen.pool, gen.run(seq, prompt, SamplingParams(max_tokens=5, ignore_eos=True)))
    )
    answer = [e.token_id for e in events if e.token_id is not None]
    assert len(answer) == 5 and seq.tokens == prompt + answer[:-1]  # the last one: the caller's to feed
    held = unheld()
    seq.release()
    assert unheld() == free and held < free and len(cache) > 0

    # Cancelled while the re-read prompt is read: its sequence is freed, the history kept.
    seq = gen.new_sequence("c:")
    steps = run_alone(gen.model, gen.pool, gen.run(seq, prompt, SamplingParams(max_tokens=5)))
    ticks = 0
    for event in steps:
        ticks += event is TICK
        if ticks == len(prompt) // CHUNK + 2:  # the prompt's chunks after the first, then two more
            break
    steps.close()
    assert seq.tokens == prompt
    seq.release()
    assert unheld() == free


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_the_default_model_reads_back_a_fact_its_memory_holds(default_model, cpu_kernels, index: int) -> None:
    """Real text, a fact planted at depth 0.25 or 0.75 of a 4k-token prompt of the recall
    suite's tuning split, the resident window 1024 tokens: the fact's block is evicted (or,
    at 0.75, resident but 700+ tokens back) when the question is asked."""
    try:
        case = recall_case(default_model.tokenizer, "single", 4096, "tune", index, 2)
    except HaystackMissing as e:
        pytest.skip(str(e))
    cfg = LongContextConfig.derive(8192, 16, resident=1024, reread=8)
    gen = Generator(default_model, 8192, long_context=cfg, store=InProcessBlockStore())
    out = gen.generate(case.prompt, SamplingParams(max_tokens=case.max_new_tokens))
    assert case.score(out.text) == 1, (case.answers, out.text)
