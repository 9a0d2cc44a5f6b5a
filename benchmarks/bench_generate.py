"""Prefill and decode throughput, infinikv vs transformers `generate`, same weights, one run.

    python benchmarks/bench_generate.py [--lengths 512 2048 6144] [--dtype float32]
        [--quantize bf16|int4|int4-decode] [--repeats 3] [--long-context]

Each engine runs in its own subprocess (so its RSS, once the model is loaded and at its
peak, is its own); both read the same
converted default model. --quantize applies to infinikv only (transformers runs the
de-quantized weights in --dtype). Each length is generated --repeats times per engine and
the medians are reported (prefill: prompt to first token; decode: first to last token, from
transformers' streamer timestamps, one `generate` call each). Prints a table and writes
benchmarks/results/generate-*.json. --long-context adds infinikv with the long-context
defaults (what `infinikv generate --file` runs) as a third engine, beside the plain one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_features, cpu_name

from infinikv.model.linear import QUANTIZATIONS

LONG = "infinikv-long-context"

TEXT = (
    "The lighthouse keeper rose before dawn, as he had every day for thirty years. He climbed "
    "the spiral stairs, counted the steps, and wiped the salt from the great lens. "
)


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer(TEXT * (length // 20 + 1))["input_ids"]
    return ids[:length]


def median_row(n: int, runs: list[tuple[float, float]]) -> dict:
    """One length's row: the medians of its runs' (prefill tok/s, decode tok/s), and the runs."""
    return {
        "prompt_tokens": n,
        "prefill_tok_s": statistics.median(p for p, _ in runs),
        "decode_tok_s": statistics.median(d for _, d in runs),
        "runs": [list(r) for r in runs],
    }


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_infinikv(
    lengths: list[int], new_tokens: int, dtype: str, quantize: str, repeats: int, long_context: bool = False
) -> tuple[list[dict], float]:
    from infinikv.engine.generator import Generator
    from infinikv.engine.sampling import SamplingParams
    from infinikv.service.runtime import build_generator
    from infinikv.service.settings import Settings

    # Plain attention over the whole prompt, as transformers does: this measures the decoder
    # and the paged cache; long_context: the defaults' regions and memory on the same prompts.
    gen: Generator = build_generator(Settings(dtype=dtype, quantize=quantize, long_context=long_context))
    loaded_mb = rss_mb()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    gen.generate(prompt_ids(gen.tokenizer, 32), SamplingParams(max_tokens=4))  # warm-up
    rows = []
    for n in lengths:
        runs = []
        for _ in range(repeats):
            result = gen.generate(prompt_ids(gen.tokenizer, n), params)
            # the first token comes with the prefill; the rest are decode steps
            runs.append((n / result.prefill_seconds, (len(result.token_ids) - 1) / result.decode_seconds))
        rows.append(median_row(n, runs))
    return rows, loaded_mb


def run_transformers(
    lengths: list[int], new_tokens: int, dtype: str, quantize: str, repeats: int
) -> tuple[list[dict], float]:
    import torch
    from bench_long_context import _TokenClock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infinikv.model.default import default_gguf
    from infinikv.model.loader import convert_gguf
    from infinikv.service.settings import Settings

    settings = Settings(dtype=dtype)
    path = convert_gguf(default_gguf(settings.cache_dir), settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=settings.torch_dtype).eval()
    loaded_mb = rss_mb()

    def timed(ids: list[int], new: int) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) of one `generate` call."""
        clock = _TokenClock()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock
            )
        return len(ids) / (clock.times[1] - t0), clock.decode_tok_s()

    timed(prompt_ids(tokenizer, 32), 4)  # warm-up
    rows = []
    for n in lengths:
        ids = prompt_ids(tokenizer, n)
        rows.append(median_row(n, [timed(ids, new_tokens) for _ in range(repeats)]))
    return rows, loaded_mb


def worker(engine: str, lengths: list[int], new_tokens: int, dtype: str, quantize: str, repeats: int) -> None:
    if engine == "transformers":
        rows, loaded_mb = run_transformers(lengths, new_tokens, dtype, quantize, repeats)
    else:
        rows, loaded_mb = run_infinikv(lengths, new_tokens, dtype, quantize, repeats, engine == LONG)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"engine": engine, "rows": rows, "loaded_rss_mb": loaded_mb, "peak_rss_mb": peak_mb}))


def ratio_table(rows: list[dict], reference: list[dict], names: str) -> None:
    """A markdown table of prefill and decode tok/s of `rows` against `reference`, per length."""
    print(f"| prompt | prefill tok/s ({names} / ratio) | decode tok/s ({names} / ratio) |")
    print("|---:|---:|---:|")
    for a, b in zip(rows, reference, strict=True):
        print(
            f"| {a['prompt_tokens']} | {a['prefill_tok_s']:.0f} / {b['prefill_tok_s']:.0f} / "
            f"{a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x | {a['decode_tok_s']:.1f} / "
            f"{b['decode_tok_s']:.1f} / {a['decode_tok_s'] / b['decode_tok_s']:.2f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 6144])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--quantize", choices=QUANTIZATIONS, default="none")
    ap.add_argument("--repeats", type=int, default=3, help="generations per length and engine (medians)")
    ap.add_argument(
        "--long-context", action="store_true", help="also infinikv with the long-context defaults"
    )
    ap.add_argument("--worker", choices=["infinikv", "transformers", LONG], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.lengths, args.new_tokens, args.dtype, args.quantize, args.repeats)
        return
    results = {}
    for engine in ("transformers", "infinikv", *([LONG] if args.long_context else [])):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            engine,
            "--new-tokens",
            str(args.new_tokens),
            "--dtype",
            args.dtype,
            "--quantize",
            args.quantize,
            "--repeats",
            str(args.repeats),
            "--lengths",
            *map(str, args.lengths),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    hf, ours = results["transformers"], results["infinikv"]
    print(
        f"dtype={args.dtype} quantize={args.quantize} (infinikv) new tokens={args.new_tokens} "
        f"repeats={args.repeats} (medians) CPU: {cpu_name()} ({', '.join(cpu_features()) or 'no AVX2'})"
    )
    ratio_table(ours["rows"], hf["rows"], "ours / HF")
    if LONG in results:
        print(f"\ninfinikv with the long-context defaults ({LONG}) against plain infinikv:")
        ratio_table(results[LONG]["rows"], ours["rows"], "long / plain")
    print(
        f"RSS MB once loaded: infinikv {ours['loaded_rss_mb']:.0f}, transformers {hf['loaded_rss_mb']:.0f}; "
        f"peak: infinikv {ours['peak_rss_mb']:.0f}, transformers {hf['peak_rss_mb']:.0f}"
    )
    suffix = args.dtype + ("" if args.quantize == "none" else f"-{args.quantize}")
    suffix += "-long-context" if args.long_context else ""
    out_path = Path(__file__).parent / "results" / f"generate-{suffix}.json"
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
