"""Re-reading's choices on the recall suite (engine/reread.py), each case prefilled once.

Each case's prompt runs through the defaults without re-reading, in the generator's chunks;
the last chunk's last row records, per layer, its attention over the whole history two
ways: as the sequence reads it (resident keys at their places, evicted ones by the key
sketch at the memory distance) and uniform (every key at the memory distance). Then, per tally and band of
layers: where the planted fact's window ranks among the windows a re-read picks (0: first);
and per (passages, margin, reach to whole lines, order, floor, band): the plain model's answer
over the re-read prompt.

    python benchmarks/bench_reread.py --split tune --length 16384 --cases 10

Rows go to benchmarks/results/reread.json (date, CPU, the ranks, the accuracies).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import time
from pathlib import Path

import torch
from machine import cpu_name

from infinikv.attention.tally import AttentionTally, top_windows
from infinikv.engine.generator import Generator
from infinikv.engine.lines import LINE_REACH
from infinikv.engine.reread import ORDERS, WINDOW_TOKENS, Reread
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import feed
from infinikv.evaluation.recall import RecallCase, recall_case
from infinikv.service.runtime import build_generator
from infinikv.service.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "reread.json"
TOP = 50  # ranks are counted up to this; beyond: TOP + 1


class PerLayer:
    """Both tallies of one row, layer by layer."""

    def __init__(self, layers: int) -> None:
        self.exact = [AttentionTally() for _ in range(layers)]
        self.uniform = [AttentionTally(uniform=True) for _ in range(layers)]

    def observe(self, layer: int, *args) -> None:
        self.exact[layer].observe(layer, *args)
        self.uniform[layer].observe(layer, *args)

    def shares(self, kind: str, n: int) -> torch.Tensor:
        """(layers, n) shares of the history's n tokens."""
        rows = [t.shares()[:n] for t in getattr(self, kind)]
        return torch.stack([torch.nn.functional.pad(r, (0, n - r.shape[0])) for r in rows])


def tallies(gen: Generator, args: argparse.Namespace) -> list[tuple[RecallCase, PerLayer]]:
    """(case, per-layer tallies) for every case, through `gen` (the defaults, no re-reading)."""
    out = []
    for index in range(args.cases):
        case = recall_case(gen.tokenizer, args.task, args.length, args.split, index, args.cases)
        t0 = time.perf_counter()
        seq = gen.new_sequence(f"bench:{index}:")
        last = (len(case.prompt) - 1) // gen.chunk_size * gen.chunk_size  # as Generator.run chunks it
        feed(gen.model, gen.pool, seq, case.prompt[:last], gen.chunk_size, "none")
        seq.tally = recorder = PerLayer(gen.loaded.config.num_layers)  # type: ignore[assignment]
        feed(gen.model, gen.pool, seq, case.prompt[last:], gen.chunk_size)
        seq.release()
        out.append((case, recorder))
        print(f"case {index}: prefilled in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def window_rank(reread: Reread, shares: torch.Tensor, n: int, fact: tuple[int, int]) -> int:
    """Where the first window overlapping the fact comes among those a re-read picks."""
    mass = shares[reread.head : n - reread.tail].double()
    for rank, (_, _, first) in enumerate(top_windows([mass], WINDOW_TOKENS, TOP + 1)):
        start = reread.head + first
        if start < fact[1] and start + WINDOW_TOKENS > fact[0]:
            return rank
    return TOP + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="tune")
    ap.add_argument("--task", default="single")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--passages", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--margins", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--reaches", type=int, nargs="+", default=[0, LINE_REACH], help="to whole lines")
    ap.add_argument("--bands", nargs="+", default=["0:10", "10:20", "20:30", "0:30", "10:30"])
    ap.add_argument("--orders", nargs="+", default=["position"], choices=ORDERS)
    ap.add_argument("--floors", type=float, nargs="+", default=[0.0], help="of the best window's share")
    args = ap.parse_args()
    gen = build_generator(Settings(reread=0))
    cases = tallies(gen, args)
    lc = Settings().long_context_config(gen.loaded.config.max_position_embeddings)
    assert lc is not None and lc.rereader is not None
    base = lc.rereader  # the default head and tail
    bands = [tuple(int(x) for x in b.split(":")) for b in args.bands]
    ranks = {}
    for kind in ("exact", "uniform"):
        for lo, hi in bands:
            got = []
            for case, rec in cases:
                n = len(case.prompt)
                shares = rec.shares(kind, n)[lo:hi].sum(0)
                got.append(window_rank(base, shares, n, case.answer_tokens(gen.tokenizer)[0]))
            ranks[f"{kind} {lo}:{hi}"] = got
            print(f"rank of the fact's window, {kind} layers {lo}:{hi}: {got}", flush=True)
    plain = build_generator(Settings(long_context=False))
    accuracy, prompt_tokens = {}, {}  # per re-read's choices: answers found, mean prompt length
    for lo, hi in bands[-1:]:
        for passages in args.passages:
            for margin in args.margins:
                for reach, order, floor in itertools.product(args.reaches, args.orders, args.floors):
                    reread = Reread(passages, margin, base.head, base.tail, reach, order, floor)
                    found, sizes = [], []
                    for case, rec in cases:
                        n = len(case.prompt)
                        shares = rec.shares("uniform", n)[lo:hi].sum(0)
                        prompt = reread.prompt(shares, case.prompt, plain.separator, plain.line_breaks)
                        sizes.append(len(prompt))
                        text = plain.generate(prompt, SamplingParams(max_tokens=case.max_new_tokens)).text
                        found.append(case.score(text))
                    key = f"passages {passages} margin {margin} reach {reach} order {order} layers {lo}:{hi}"
                    key += f" floor {floor}" if floor else ""
                    accuracy[key], prompt_tokens[key] = found, round(sum(sizes) / len(sizes))
                    print(
                        f"{key}: {100 * sum(found) / len(found):.0f}% {found}, {prompt_tokens[key]} tokens",
                        flush=True,
                    )
    row = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "split": args.split,
        "task": args.task,
        "length": args.length,
        "cases": args.cases,
        "ranks": ranks,
        "accuracy": accuracy,
        "prompt_tokens": prompt_tokens,
    }
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
