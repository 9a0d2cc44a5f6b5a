"""Passkey retrieval accuracy, decode tokens/s and peak RSS vs context length, per mode:

    transformers  full attention (transformers `generate`, everything resident)
    sliding       infinikv, resident window, evicted blocks dropped
    selfextend    infinikv, Self-Extend only: everything resident, groups chosen by LongLM's rule
    memory        infinikv, resident window + kNN memory, no grouping (G=1)
    se+memory     infinikv, resident window with Self-Extend + kNN memory

    python benchmarks/bench_long_context.py --lengths 2048 4096 8192 16384 32768 --depths 5

Every (mode, length) runs in its own process (peak RSS is its own). Rows replace the rows of
the same (mode, length, variant) in benchmarks/results/long_context.json, so a run can measure
some cells with fewer depths (`--depths`); the charts docs/long_context_{accuracy,speed}.png
are drawn from the default variant's rows. A variant changes the memory modes' index,
granularity, sketch interval, RAM budget or block store, or the infinikv modes' weights (`--quantize
int4`: the GGUF's own 4-bit groups; transformers keeps the de-quantized float32 weights) or
kernels (`--attention-backend torch`: the plain-PyTorch path instead of the CPU kernels):

    python benchmarks/bench_long_context.py --modes se+memory --lengths 32768 --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infinikv.attention.backends import BACKENDS
from infinikv.engine.regions import LongContextConfig
from infinikv.memory.index import INDEX_KINDS
from infinikv.model.linear import QUANTIZATIONS

MODES = ["transformers", "sliding", "selfextend", "memory", "se+memory"]
RESIDENT, WINDOW, GROUP = 1024, 256, 4  # the resident budget every infinikv mode shares
NEW_TOKENS = 16
TRAINED = 8192  # SmolLM2-135M's trained length


def long_context_config(mode: str, length: int, args: argparse.Namespace):
    memory = {
        "index": args.index,
        "granularity": args.granularity,
        "sketch_every": args.sketch_every,
        "ram_budget_mb": args.ram_budget_mb,
    }
    if mode == "sliding":
        return LongContextConfig.derive(
            TRAINED, 16, resident=RESIDENT, window=RESIDENT // 2, group=1, memory=False
        )
    if mode == "memory":
        return LongContextConfig.derive(
            TRAINED, 16, resident=RESIDENT, window=RESIDENT // 2, group=1, **memory
        )
    if mode == "se+memory":
        return LongContextConfig.derive(TRAINED, 16, resident=RESIDENT, window=WINDOW, group=GROUP, **memory)
    # Self-Extend only: all of the prompt resident, W = 1024 and the smallest G with
    # (L - W) * G + W >= N (LongLM's rule), at least 2.
    n = length + NEW_TOKENS + 64
    w = 1024
    g = max(2, math.ceil((n - w) / (TRAINED - w)))
    return LongContextConfig.derive(TRAINED, 16, resident=n, window=w, group=g, memory=False)


def variant(args: argparse.Namespace) -> str:
    """The options that differ from the defaults, e.g. "index=ivf store=redis"; "" for none."""
    parts = [f"index={args.index}"] * (args.index != "flat")
    parts += [f"granularity={args.granularity}"] * (args.granularity != "block")
    parts += [f"sketch_every={args.sketch_every}"] * (args.sketch_every != LongContextConfig.sketch_every)
    parts += [f"ram_budget_mb={args.ram_budget_mb}"] * (args.ram_budget_mb != LongContextConfig.ram_budget_mb)
    parts += ["store=redis"] * bool(args.redis_url)
    parts += [f"quantize={args.quantize}"] * (args.quantize != "none")
    parts += [f"attention_backend={args.attention_backend}"] * (args.attention_backend != "auto")
    return " ".join(parts)


def run_cell(mode: str, length: int, args: argparse.Namespace) -> dict:
    import torch

    from infinikv.evaluation.passkey import found, passkey_case
    from infinikv.service.settings import Settings

    settings = Settings()
    tokenizer = _tokenizer(settings)
    depths = args.depths
    cases = [passkey_case(tokenizer, length, (i + 0.5) / depths, seed=i) for i in range(depths)]
    hits, decode = 0, []
    if mode == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(_model_dir(settings), dtype=torch.float32).eval()
        with torch.no_grad():  # warm-up: first calls pay one-time costs that would skew timings
            model.generate(torch.tensor([cases[0].prompt[:64]]), max_new_tokens=4, do_sample=False)
        for case in cases:
            clock = _TokenClock()
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([case.prompt]),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    streamer=clock,
                )
            answer = tokenizer.decode(out[0, len(case.prompt) :], skip_special_tokens=True)
            hits += found(case.key, answer)
            decode.append(clock.decode_tok_s())
    else:
        from infinikv.engine.sampling import SamplingParams

        gen = long_context_generator(settings, mode, length, args)
        for case in cases:
            result = gen.generate(case.prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
            hits += found(case.key, result.text)
            decode.append((len(result.token_ids) - 1) / result.decode_seconds)
    return {
        "mode": mode,
        "length": length,
        "variant": variant(args),
        "cases": len(cases),
        "accuracy": hits / len(cases),
        "decode_tok_s": sum(decode) / len(decode),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def long_context_generator(settings, mode: str, length: int, args: argparse.Namespace):
    """An infinikv Generator on the default model for one infinikv mode at one length, with
    the variant `args` names (quantize, attention_backend, index, granularity, sketch_every,
    ram_budget_mb, redis_url)."""
    from infinikv.engine.generator import Generator
    from infinikv.memory.store import open_store
    from infinikv.model.loader import load_model
    from infinikv.service.runtime import attach_kernels

    loaded = load_model(None, settings.cache_dir, quantize=args.quantize)
    attach_kernels(loaded, args.attention_backend)
    config = long_context_config(mode, length, args)
    store = open_store(args.redis_url, cluster=False)  # in-process (the default) without a URL
    return Generator(loaded, max_seq_len=64, long_context=config, store=store)


class _TokenClock:
    """A transformers streamer that only timestamps: `put` gets the prompt, then each token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tok_s(self) -> float:
        """Tokens after the first (which ends the prefill) per second."""
        tokens = self.times[1:]  # times[0] is the prompt
        return (len(tokens) - 1) / (tokens[-1] - tokens[0])


def _model_dir(settings):
    from infinikv.model.loader import resolve_model_dir

    return resolve_model_dir(settings.model, settings.cache_dir)


def _tokenizer(settings):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(settings))


# One marker and line style per mode, in MODES order: modes often score alike.
STYLES: list[dict[str, Any]] = [
    dict(marker=m, ls=ls) for m, ls in zip("os^Dv", ["-", "--", "-.", ":", "-"], strict=True)
]


def length_axis(ax, rows: list[dict]) -> None:
    """A log2 prompt-length axis with a tick at each measured length, labelled 2k, 4k, ..."""
    lengths = sorted({r["length"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("prompt tokens")


def charts(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in rows if not r.get("variant")]
    for i, mode in enumerate(MODES):
        pts = sorted((r["length"], r["accuracy"] * 100) for r in rows if r["mode"] == mode)
        if pts:
            # Nested markers of shrinking size keep equal scores visible.
            ax.plot(*zip(*pts, strict=True), markersize=13 - 2 * i, label=mode, **STYLES[i])
    ax.axvline(TRAINED, color="grey", ls=":", label="trained length")
    ax.set(ylabel="passkey accuracy %", title="Passkey retrieval, SmolLM2-135M")
    length_axis(ax, rows)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "long_context_accuracy.png", dpi=120)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(MODES):
        pts = sorted((r["length"], r["decode_tok_s"], r["peak_rss_mb"]) for r in rows if r["mode"] == mode)
        if pts:
            xs, tok, rss = zip(*pts, strict=True)
            a1.plot(xs, tok, label=mode, **STYLES[i])
            a2.plot(xs, rss, label=mode, **STYLES[i])
    a1.set(ylabel="decode tokens/s")
    a2.set(ylabel="peak RSS MB")
    for ax in (a1, a2):
        length_axis(ax, rows)
    a1.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "long_context_speed.png", dpi=120)


def arguments() -> argparse.ArgumentParser:
    """This script's options; `arguments().parse_args([])` is the default variant."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--index", choices=INDEX_KINDS, default="flat", help="memory modes' FAISS index")
    ap.add_argument("--granularity", choices=["block", "token"], default="block")
    ap.add_argument(
        "--sketch-every",
        type=int,
        default=LongContextConfig.sketch_every,
        help="memory modes' positions per full read of the key sketch",
    )
    ap.add_argument(
        "--ram-budget-mb",
        type=int,
        default=LongContextConfig.ram_budget_mb,
        help="memory modes' host RAM for evicted blocks and search structures",
    )
    ap.add_argument("--redis-url", help="memory modes' block store (default: in-process)")
    ap.add_argument("--attention-backend", choices=BACKENDS, default="auto", help="infinikv's kernels")
    ap.add_argument(
        "--quantize", choices=QUANTIZATIONS, default="none", help="infinikv modes' decoder weights"
    )
    ap.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = arguments().parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], int(args.cell[1]), args)))
        return
    root = Path(__file__).resolve().parent
    results = root / "results" / "long_context.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    for length in args.lengths:
        for mode in args.modes:
            cmd = [sys.executable, *sys.argv, "--cell", mode, str(length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            key = (mode, length, row["variant"])
            rows = [r for r in rows if (r["mode"], r["length"], r.get("variant", "")) != key] + [row]
            rows.sort(key=lambda r: (r["length"], MODES.index(r["mode"]), r.get("variant", "")))
            print(
                f"{mode:>12} {length:>6} {row['variant']}: accuracy {row['accuracy']:.0%} of {row['cases']}  "
                f"decode {row['decode_tok_s']:.1f} tok/s  peak RSS {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            # After every cell: a long run keeps its rows.
            results.write_text(json.dumps(rows, indent=2) + "\n")
    charts(rows, root.parent / "docs")


if __name__ == "__main__":
    main()
