"""The recall suite (infinikv/evaluation/recall.py): RULER-style tasks over real text, per
engine mode, prompt length and split, in one run on one machine.

    transformers  transformers full attention (up to --transformers-max tokens)
    plain         infinikv --no-long-context (plain attention, everything in the KV pool)
    selfextend    infinikv Self-Extend only: everything resident, G by LongLM's rule
    sliding       infinikv defaults with --no-memory (evicted blocks dropped)
    defaults      infinikv defaults (what `infinikv generate --file` runs)

    python benchmarks/bench_recall.py --split tune --lengths 4096 8192 --cases 10
    python benchmarks/bench_recall.py --modes defaults --set resident=8192 --set window=4096
    python benchmarks/bench_recall.py --report          # tables and chart from the results

Every case's row goes to benchmarks/results/recall.jsonl as it finishes (mode, variant,
task, length, split, index, score, timings, the generated text); a row already there for the
same key is skipped, so a run that stops resumes where it was. `--set KEY=VALUE` (a Settings
field, repeatable) runs the infinikv modes with other settings: the variant (with `--tag`,
which names the code measured after a change of its results). Each (mode,
length) runs in its own process. `--report` prints a table per split (accuracy in % by task
and length, one column per mode) and draws docs/recall_<split>.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from machine import cpu_name

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "recall.jsonl"
MODES = ["transformers", "plain", "selfextend", "sliding", "defaults"]
LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]
TRAINED = 8192  # SmolLM2-135M's trained length
# Self-Extend only: W = 1024 and the smallest G >= 2 with (L - W) * G + W >= N (LongLM's rule,
# as bench_long_context.py).
SELF_EXTEND_WINDOW = 1024


def mode_settings(mode: str, length: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields of an infinikv mode at a prompt length."""
    room = length + 256  # the prompt and the answer
    if mode == "plain":
        return {**overrides, "long_context": False, "max_seq_len": room}
    if mode == "selfextend":
        group = max(2, math.ceil((room - SELF_EXTEND_WINDOW) / (TRAINED - SELF_EXTEND_WINDOW)))
        return {
            **overrides,
            "resident": room + 64,
            "window": SELF_EXTEND_WINDOW,
            "group": group,
            "memory": False,
        }
    if mode == "sliding":
        return {**overrides, "memory": False}
    return dict(overrides)


def run_cell(mode: str, length: int, args: argparse.Namespace, done: set[tuple]) -> None:
    """Every case of the requested tasks for one (mode, length): rows appended as they finish."""
    import torch

    from infinikv.engine.sampling import SamplingParams
    from infinikv.evaluation.recall import recall_case
    from infinikv.service.runtime import build_generator
    from infinikv.service.settings import Settings

    overrides = parse_sets(args.set)
    variant = variant_name(overrides, args.tag)
    settings = Settings(**mode_settings(mode, length, overrides))
    long_context = None if mode == "transformers" else settings.long_context_config(TRAINED)
    if mode == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from infinikv.model.loader import resolve_model_dir

        path = resolve_model_dir(settings.model, settings.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def answer(prompt: list[int], max_tokens: int) -> tuple[str, float, float]:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
            text = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
            return text, time.perf_counter() - t0, 0.0
    else:
        generator = build_generator(settings)
        tokenizer = generator.tokenizer

        def answer(prompt: list[int], max_tokens: int) -> tuple[str, float, float]:
            result = generator.generate(prompt, SamplingParams(max_tokens=max_tokens))
            return result.text, result.prefill_seconds, result.decode_seconds

    for task in args.tasks:
        for index in range(args.cases):
            key = (mode, variant, task, length, args.split, index)
            if key in done:
                continue
            case = recall_case(tokenizer, task, length, args.split, index, args.cases)
            text, prefill, decode = answer(case.prompt, case.max_new_tokens)
            row = {
                "mode": mode,
                "variant": variant,
                "task": task,
                "length": length,
                "split": args.split,
                "index": index,
                "cases": args.cases,
                "score": case.score(text),
                "haystack": case.haystack,
                "depths": case.depths,
                "prompt_tokens": len(case.prompt),
                "prefill_s": round(prefill, 2),
                "decode_s": round(decode, 2),
                "answers": case.answers,
                "output": text,
                "date": datetime.date.today().isoformat(),
                "cpu": cpu_name(),
                "chunk_dtype": long_context.chunk_dtype if long_context else None,
            }
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{mode} {variant} {task} {length} {args.split}#{index}: {row['score']:.2f} {text!r}",
                flush=True,
            )


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items -> Settings overrides (values as JSON where they parse)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def variant_name(overrides: dict[str, Any], tag: str = "") -> str:
    return " ".join([f"{k}={v}" for k, v in sorted(overrides.items())] + ([f"@{tag}"] if tag else []))


def load_rows() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict]) -> dict[tuple, tuple[float, int]]:
    """(split, mode, variant, task, length) -> (mean score %, cases)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[r["split"], r["mode"], r["variant"], r["task"], r["length"]].append(r["score"])
    return {k: (100 * sum(v) / len(v), len(v)) for k, v in groups.items()}


def report(rows: list[dict], out_dir: Path) -> None:
    """Per split: a markdown table (rows task x length, columns mode/variant) and a chart."""
    from infinikv.evaluation.recall import TASKS

    summary = summarize(rows)
    for split in sorted({k[0] for k in summary}):
        columns = sorted(
            {(k[1], k[2]) for k in summary if k[0] == split},
            key=lambda c: (MODES.index(c[0]) if c[0] in MODES else len(MODES), c[1]),
        )
        names = [m + (f" [{v}]" if v else "") for m, v in columns]
        print(f"\n{split} split: accuracy % (cases)\n")
        print("| task | tokens | " + " | ".join(names) + " |")
        print("|---|---:|" + "---:|" * len(columns))
        for task in TASKS:
            for length in sorted({k[4] for k in summary if k[0] == split and k[3] == task}):
                cells = []
                for mode, variant in columns:
                    hit = summary.get((split, mode, variant, task, length))
                    cells.append("" if hit is None else f"{hit[0]:.0f} ({hit[1]})")
                print(f"| {task} | {length} | " + " | ".join(cells) + " |")
        chart(summary, split, columns, out_dir / f"recall_{split}.png")


def chart(summary: dict, split: str, columns: list[tuple[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infinikv.evaluation.recall import TASKS

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.6), sharey=True)
    colours = plt.get_cmap("tab20")  # a column keeps its colour and marker in every panel
    for ax, task in zip(axes, TASKS, strict=True):
        for i, (mode, variant) in enumerate(columns):
            pts = sorted((k[4], v[0]) for k, v in summary.items() if k[:4] == (split, mode, variant, task))
            if pts:
                label = mode + (f" [{variant}]" if variant else "")
                style = {"marker": "os^Dv<>"[i % 7], "color": colours(i % 20)}
                ax.plot(*zip(*pts, strict=True), label=label, **style)
        ax.axvline(TRAINED, color="grey", ls=":")
        ax.set_xscale("log", base=2)
        lengths = sorted({k[4] for k in summary if k[0] == split})
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.minorticks_off()
        ax.set(title=task, xlabel="prompt tokens")
    axes[0].set_ylabel(f"accuracy % ({split} split)")
    labelled = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=2, fontsize=7)
    legend_rows = math.ceil(len(labelled) / 2)
    fig.set_figheight(3.6 + 0.2 * legend_rows)
    fig.tight_layout(rect=(0, 0.2 * legend_rows / fig.get_figheight() + 0.02, 1, 1))
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)


def arguments() -> argparse.ArgumentParser:
    from infinikv.evaluation.recall import SPLITS, TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--split", choices=SPLITS, default="tune")
    ap.add_argument("--cases", type=int, default=10, help="cases per (task, length), depths spread evenly")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a Settings field (repeatable)")
    ap.add_argument(
        "--tag",
        default="",
        help="names the code measured, after a change of results (rows of another tag are not reused)",
    )
    ap.add_argument("--transformers-max", type=int, default=16384, help="longest prompt transformers runs")
    ap.add_argument("--selfextend-max", type=int, default=32768, help="longest prompt Self-Extend only runs")
    ap.add_argument("--plain-max", type=int, default=TRAINED, help="longest prompt --no-long-context runs")
    ap.add_argument("--report", action="store_true", help="print the tables and draw the charts only")
    ap.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = arguments().parse_args()
    done = {
        (r["mode"], r["variant"], r["task"], r["length"], r["split"], r["index"])
        for r in load_rows()
        if r["cases"] == args.cases
    }
    if args.cell:
        run_cell(args.cell[0], int(args.cell[1]), args, done)
        return
    if not args.report:
        limits = {
            "transformers": args.transformers_max,
            "selfextend": args.selfextend_max,
            "plain": args.plain_max,
        }
        RESULTS.parent.mkdir(exist_ok=True)
        for length in args.lengths:
            for mode in args.modes:
                if length > limits.get(mode, length):
                    continue
                subprocess.run([sys.executable, *sys.argv, "--cell", mode, str(length)], check=True)
    report(load_rows(), ROOT.parent / "docs")


if __name__ == "__main__":
    main()
