"""KV pages in bfloat16 against float32: what a decode step gains, what the logits lose.

    python benchmarks/bench_kv_dtype.py [--quantize none|bf16|int4] [--lengths 512 2048 6144]
        [--rounds 4] [--haystack bible|debian]

One process, one loaded model (plain attention), two generators that differ only in their
pages' dtype. Speed: per length, --rounds rounds of one greedy generation of 64 tokens
each way, alternating (so a busy machine slows both alike); the median decode tok/s and
the ratio. Quality: per length, a window of real prose of that many tokens (the haystack
the recall suite reads), fed teacher-forced through both pools in 512-token chunks, then
its last 64 tokens as decode steps: how often the two pick the same next token, and the
median and largest gap between their log-probabilities of it. Prints the CPU and a table;
appends a row to benchmarks/results/kv_dtype.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import prompt_ids  # noqa: E402
from benchmarks.machine import append_record  # noqa: E402
from infinikv.engine.generator import Generator  # noqa: E402
from infinikv.engine.sampling import SamplingParams  # noqa: E402
from infinikv.engine.sequence import Sequence, feed  # noqa: E402
from infinikv.evaluation.haystack import haystack_text  # noqa: E402
from infinikv.model.linear import QUANTIZATIONS  # noqa: E402
from infinikv.service.runtime import build_generator  # noqa: E402
from infinikv.service.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kv_dtype.jsonl"
DTYPES = (torch.float32, torch.bfloat16)
STEPS = 64


def decode_speed(gens: dict[torch.dtype, Generator], n: int, rounds: int) -> dict[torch.dtype, float]:
    """Median decode tok/s of each generator on an n-token prompt, alternating."""
    ids = prompt_ids(gens[torch.float32].tokenizer, n)
    params = SamplingParams(max_tokens=STEPS, ignore_eos=True)
    runs: dict[torch.dtype, list[float]] = {dt: [] for dt in gens}
    for _ in range(rounds):
        for dt, gen in gens.items():
            result = gen.generate(ids, params)
            runs[dt].append((len(result.token_ids) - 1) / result.decode_seconds)
    return {dt: statistics.median(r) for dt, r in runs.items()}


def teacher_forced(gen: Generator, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities at every position of `ids` through a fresh pool in `dtype`:
    prefill chunks, then the last STEPS tokens one decode step each."""
    model = gen.model
    pool = model.new_page_pool(len(ids) + 64, gen.pool.page_size, dtype=dtype)
    seq = Sequence(pool)
    chunks = feed(model, pool, seq, ids[:-STEPS], gen.chunk_size, logits="all")
    steps = [feed(model, pool, seq, [t], 1, logits="all") for t in ids[-STEPS:]]
    return torch.cat([chunks, *steps]).log_softmax(-1)


def agreement(gen: Generator, text_ids: list[int], n: int) -> dict[str, float]:
    """Same next-token choices and log-probability gaps of bfloat16 pages against float32 ones
    over the first n tokens of `text_ids` (and over its last STEPS, the decode steps)."""
    ids = text_ids[:n]
    want, got = (teacher_forced(gen, ids, dt) for dt in DTYPES)
    same = (want.argmax(-1) == got.argmax(-1)).float()
    picked = want.argmax(-1, keepdim=True)
    gap = (want.gather(-1, picked) - got.gather(-1, picked)).abs().flatten()
    return {
        "same_choice": same.mean().item(),
        "same_choice_decode": same[-STEPS:].mean().item(),
        "median_gap": gap.median().item(),
        "max_gap": gap.max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", choices=QUANTIZATIONS, default="none")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 6144])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--haystack", choices=["bible", "debian"], default="debian")
    args = ap.parse_args()
    settings = Settings(quantize=args.quantize, long_context=False, prefix_cache=False)
    first = build_generator(settings)
    gens = {
        dt: Generator(first.loaded, settings.max_seq_len, settings.page_size, prefix_cache=False, kv_dtype=dt)
        for dt in DTYPES
    }
    text_ids = first.tokenizer(haystack_text(args.haystack), add_special_tokens=False)["input_ids"]
    rows = []
    for n in args.lengths:
        speed = decode_speed(gens, n, args.rounds)
        rows.append(
            {
                "prompt_tokens": n,
                "decode_tok_s": {str(dt).removeprefix("torch."): s for dt, s in speed.items()},
                "ratio": speed[torch.bfloat16] / speed[torch.float32],
                **agreement(first, text_ids, n),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    fields = {"quantize": args.quantize, "haystack": args.haystack, "rounds": args.rounds, "rows": rows}
    record = append_record(RESULTS, fields)
    print(f"CPU: {record['cpu']} ({', '.join(record['features'])}); quantize={args.quantize}; ", end="")
    print(f"{args.haystack} prose; decode: medians of {args.rounds} alternating rounds of {STEPS} tokens")
    print(
        "| prompt | decode tok/s float32 / bfloat16 pages | ratio | same next token (decode steps) |", end=""
    )
    print(" log-prob gap median / max |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["decode_tok_s"]
        print(
            f"| {r['prompt_tokens']} | {s['float32']:.1f} / {s['bfloat16']:.1f} | {r['ratio']:.2f}x | "
            f"{r['same_choice']:.1%} ({r['same_choice_decode']:.1%}) | "
            f"{r['median_gap']:.4f} / {r['max_gap']:.3f} |"
        )


if __name__ == "__main__":
    main()
