"""Retrieval against exact attention (infinikv/evaluation/retrieval.py): at the decode steps of
single-needle cases of the recall suite over real text, the share of the exact top keys'
attention mass that each ranking's selection captures, per layer, at the budget of keys
the selection reads.

    python benchmarks/bench_retrieval.py --lengths 16384 32768 --cases 3 --steps 8

Runs the default settings (`--set KEY=VALUE` for others: a Settings field, repeatable); the
rankings measured are every one in RANKINGS, side by side on the same queries. Writes
benchmarks/results/retrieval.json (one row per length and variant: each ranking's median per
layer, the minimum and mean over layers) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from bench_recall import cpu_name, parse_sets, variant_name

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval.json"


def measure(length: int, args: argparse.Namespace) -> dict:
    from infinikv.engine.sampling import SamplingParams
    from infinikv.evaluation.recall import recall_case
    from infinikv.evaluation.retrieval import RetrievalProbe
    from infinikv.service.runtime import build_generator
    from infinikv.service.settings import Settings

    overrides = parse_sets(args.set)
    generator = build_generator(Settings(**overrides))
    probe = RetrievalProbe(generator.model.long_context_attention)
    generator.model.long_context_attention = probe
    for index in range(args.cases):
        case = recall_case(generator.tokenizer, "single", length, args.split, index, args.cases)
        generator.generate(case.prompt, SamplingParams(max_tokens=args.steps + 1, ignore_eos=True))
    medians = probe.layer_medians()
    return {
        "length": length,
        "variant": variant_name(overrides),
        "cases": args.cases,
        "steps": args.steps,
        "split": args.split,
        "rankings": {
            name: {"min": min(m), "mean": sum(m) / len(m), "layers": [round(x, 4) for x in m]}
            for name, m in medians.items()
        },
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--cases", type=int, default=3, help="single-needle cases per length")
    ap.add_argument("--steps", type=int, default=8, help="decode steps measured per case")
    ap.add_argument("--split", default="tune")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a Settings field (repeatable)")
    args = ap.parse_args()
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for length in args.lengths:
        row = measure(length, args)
        rows = [r for r in rows if (r["length"], r["variant"]) != (length, row["variant"])] + [row]
        RESULTS.write_text(
            json.dumps(sorted(rows, key=lambda r: (r["length"], r["variant"])), indent=1) + "\n"
        )
        print(f"\n{length} tokens {row['variant']}: captured share of the exact top keys' mass")
        print("| ranking | min over layers | mean | per layer (0..) |")
        print("|---|---:|---:|---|")
        for name, r in row["rankings"].items():
            layers = " ".join(f"{x:.2f}" for x in r["layers"])
            print(f"| {name} | {r['min']:.2f} | {r['mean']:.2f} | {layers} |")


if __name__ == "__main__":
    main()
