"""Retrieval against exact attention (infinikv/evaluation/retrieval.py): at the decode steps of
single-needle cases of the recall suite over real text, the share of the exact top keys'
attention mass that each ranking's selection captures, per layer, at the budget of keys
the selection reads; with --chunks, also the shared selections of the prompts' prefill chunks
(every ranking in CHUNK_RANKINGS, over every row of each chunk).

    python benchmarks/bench_retrieval.py --lengths 16384 32768 --cases 3 --steps 8 [--chunks]

Runs the default settings (`--set KEY=VALUE` for others: a Settings field, repeatable); the
rankings measured are every one in RANKINGS, side by side on the same queries. Writes
benchmarks/results/retrieval.json (one row per length and variant: each ranking's median per
layer, the minimum and mean over layers) and prints a table. Decode steps read the memory
only with re-reading off (`--set reread=0`): by default an answer past the resident window is
generated over re-read passages (engine/reread.py), with no memory to rank.
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
    probe = RetrievalProbe(generator.model.long_context_attention, chunks=args.chunks)
    generator.model.long_context_attention = probe
    for index in range(args.cases):
        case = recall_case(generator.tokenizer, "single", length, args.split, index, args.cases)
        generator.generate(case.prompt, SamplingParams(max_tokens=args.steps + 1, ignore_eos=True))
    return {
        "length": length,
        "variant": variant_name(overrides),
        "cases": args.cases,
        "steps": args.steps,
        "split": args.split,
        "rankings": _summary(probe.layer_medians()),
        **({"chunk_rankings": _summary(probe.layer_medians(chunks=True))} if args.chunks else {}),
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
    }


def _summary(medians: dict[str, list[float]]) -> dict:
    return {
        name: {"min": min(m), "mean": sum(m) / len(m), "layers": [round(x, 4) for x in m]}
        for name, m in medians.items()
        if m
    }


def _print_table(title: str, rankings: dict) -> None:
    print(f"\n{title}")
    if not rankings:  # re-reading (the default) answers over passages, not the memory
        print("no step read the memory (decode steps: --set reread=0 to measure them)")
        return
    print("| ranking | min over layers | mean | per layer (0..) |")
    print("|---|---:|---:|---|")
    for name, r in rankings.items():
        layers = " ".join(f"{x:.2f}" for x in r["layers"])
        print(f"| {name} | {r['min']:.2f} | {r['mean']:.2f} | {layers} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--cases", type=int, default=3, help="single-needle cases per length")
    ap.add_argument("--steps", type=int, default=8, help="decode steps measured per case")
    ap.add_argument("--split", default="tune")
    ap.add_argument("--chunks", action="store_true", help="also the prompts' shared prefill chunks")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a Settings field (repeatable)")
    args = ap.parse_args()
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for length in args.lengths:
        row = measure(length, args)
        key = (length, row["variant"], args.split)
        rows = [r for r in rows if (r["length"], r["variant"], r["split"]) != key] + [row]
        RESULTS.write_text(
            json.dumps(sorted(rows, key=lambda r: (r["length"], r["variant"])), indent=1) + "\n"
        )
        title = f"{length} tokens {row['variant']}: captured share of the exact top keys' mass"
        _print_table(title + ", decode steps", row["rankings"])
        if args.chunks:
            _print_table(title + ", prefill chunks (shared blocks)", row["chunk_rankings"])


if __name__ == "__main__":
    main()
