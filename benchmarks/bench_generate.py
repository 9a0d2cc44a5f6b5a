"""Prefill and decode throughput, infinikv vs transformers `generate`, same weights, one run.

    python benchmarks/bench_generate.py [--lengths 512 2048 6144] [--dtype float32]
        [--quantize bf16|int4|int4-decode] [--repeats 3] [--long-context] [--kv-bf16]
        [--no-llama-cpp]

Each engine runs in its own subprocess (so its RSS, once the model is loaded and at its
peak, is its own); both read the same
converted default model. --quantize applies to infinikv only (transformers runs the
de-quantized weights in --dtype). Each length is generated --repeats times per engine and
the medians are reported (prefill: prompt to first token; decode: first to last token, from
transformers' streamer timestamps, one `generate` call each). Prints a table and writes
benchmarks/results/generate-*.json. --long-context adds infinikv with the long-context
defaults (what `infinikv generate --file` runs) as a third engine, beside the plain one;
--kv-bf16 adds plain infinikv with its KV pages in bfloat16 (`--kv-dtype bfloat16`).
--engines runs a subset: past the plain engine's 8192 tokens, `--engines infinikv-long-context
llama.cpp` (each table needs both of its engines).
When llama-cpp-python is installed, llama.cpp runs too, on the default model's own GGUF
(Q4_1 layers, Q8_0 head) with torch's thread count, the same prompt ids, greedy
(`pip install llama-cpp-python` builds it for this CPU; --no-llama-cpp skips it). Its AMX
buffers (Sapphire Rapids and later) crash llama-cpp-python 0.3.36 on prompts of more than one
token per batch: there pass --llama-cpp-batch 1 (its decode keeps the AMX kernels, its prefill
goes token by token) and --llama-cpp-batch 512 --llama-cpp-no-extra for its batched prefill.
"""

from __future__ import annotations

import argparse
import importlib.util
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
KV_BF16 = "infinikv-kv-bf16"
LLAMA_CPP = "llama.cpp"
ENGINES = ("transformers", "infinikv", LONG, KV_BF16, LLAMA_CPP)

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


def measure(timed, tokenizer, lengths: list[int], new_tokens: int, repeats: int) -> list[dict]:
    """A row per length of `timed(ids, new)`'s (prefill tok/s, decode tok/s), after a warm-up."""
    timed(prompt_ids(tokenizer, 32), 4)
    return [
        median_row(n, [timed(prompt_ids(tokenizer, n), new_tokens) for _ in range(repeats)]) for n in lengths
    ]


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_infinikv(
    lengths: list[int],
    new_tokens: int,
    dtype: str,
    quantize: str,
    repeats: int,
    long_context: bool = False,
    kv_dtype: str | None = None,
) -> tuple[list[dict], float]:
    from infinikv.engine.generator import Generator
    from infinikv.engine.sampling import SamplingParams
    from infinikv.service.runtime import build_generator
    from infinikv.service.settings import Settings

    # Plain attention over the whole prompt, as transformers does: this measures the decoder
    # and the paged cache; long_context: the defaults' regions and memory on the same prompts.
    # No prefix cache: a repeat would reuse the prompt's pages (llama.cpp's runs reset likewise).
    settings = Settings(
        dtype=dtype, quantize=quantize, long_context=long_context, kv_dtype=kv_dtype, prefix_cache=False
    )
    gen: Generator = build_generator(settings)
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

    return measure(timed, tokenizer, lengths, new_tokens, repeats), loaded_mb


def run_llama_cpp(
    lengths: list[int], new_tokens: int, repeats: int, batch: int, extra_buffers: bool
) -> tuple[list[dict], float]:
    import llama_cpp
    import torch
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from infinikv.model.default import default_gguf
    from infinikv.model.loader import convert_gguf
    from infinikv.service.settings import Settings

    settings = Settings()
    gguf = default_gguf(settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(gguf, settings.cache_dir))
    threads = torch.get_num_threads()
    if not extra_buffers:  # Llama() takes no such argument: off in the defaults it reads
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    llm = Llama(
        model_path=str(gguf),
        n_ctx=max(lengths) + new_tokens + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=batch,
        verbose=False,
    )
    loaded_mb = rss_mb()

    def timed(ids: list[int], new: int) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) of one greedy generation; `generate` never stops at EOS."""
        llm.reset()  # else `generate` reuses the previous run's matching prefix
        t0 = time.perf_counter()
        times = []
        for _ in llm.generate(ids, top_k=1, temp=0.0):
            times.append(time.perf_counter())
            if len(times) == new:
                break
        return len(ids) / (times[0] - t0), (new - 1) / (times[-1] - times[0])

    return measure(timed, tokenizer, lengths, new_tokens, repeats), loaded_mb


def worker(engine: str, args: argparse.Namespace) -> None:
    lengths, new_tokens, repeats = args.lengths, args.new_tokens, args.repeats
    if engine == "transformers":
        rows, loaded_mb = run_transformers(lengths, new_tokens, args.dtype, args.quantize, repeats)
    elif engine == LLAMA_CPP:
        extra = not args.llama_cpp_no_extra
        rows, loaded_mb = run_llama_cpp(lengths, new_tokens, repeats, args.llama_cpp_batch, extra)
    else:
        kv_dtype = "bfloat16" if engine == KV_BF16 else None
        rows, loaded_mb = run_infinikv(
            lengths, new_tokens, args.dtype, args.quantize, repeats, engine == LONG, kv_dtype
        )
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
    ap.add_argument("--kv-bf16", action="store_true", help="also infinikv with bfloat16 KV pages")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    ap.add_argument(
        "--llama-cpp-batch", type=int, default=512, help="llama.cpp's n_batch (prompt tokens per eval)"
    )
    ap.add_argument(
        "--llama-cpp-no-extra",
        action="store_true",
        help="llama.cpp without its repacked (AMX) weight buffers",
    )
    ap.add_argument(
        "--engines", nargs="+", choices=ENGINES, help="run only these (default: as the flags say)"
    )
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    results = {}
    llama_cpp = not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    engines = args.engines or (
        "transformers",
        "infinikv",
        *([LONG] if args.long_context else []),
        *([KV_BF16] if args.kv_bf16 else []),
        *([LLAMA_CPP] if llama_cpp else []),
    )
    for engine in engines:
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
            "--llama-cpp-batch",
            str(args.llama_cpp_batch),
            *(["--llama-cpp-no-extra"] if args.llama_cpp_no_extra else []),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    if LLAMA_CPP in results:
        results[LLAMA_CPP] |= {"n_batch": args.llama_cpp_batch, "extra_buffers": not args.llama_cpp_no_extra}
    print(
        f"dtype={args.dtype} quantize={args.quantize} (infinikv) new tokens={args.new_tokens} "
        f"repeats={args.repeats} (medians) CPU: {cpu_name()} ({', '.join(cpu_features()) or 'no AVX2'})"
    )
    extra = "without" if args.llama_cpp_no_extra else "with"
    llama_names = (
        f"llama.cpp (the GGUF's Q4_1 / Q8_0, same threads, n_batch {args.llama_cpp_batch}, {extra} its "
        "repacked weight buffers)"
    )
    tables = (
        ("infinikv", "transformers", "ours / HF", "infinikv against transformers:"),
        (
            LONG,
            "infinikv",
            "long / plain",
            f"infinikv with the long-context defaults ({LONG}) against plain infinikv:",
        ),
        (
            KV_BF16,
            "infinikv",
            "bf16 KV / float32 KV",
            f"infinikv with bfloat16 KV pages ({KV_BF16}) against float32 ones:",
        ),
        ("infinikv", LLAMA_CPP, "ours / llama.cpp", f"infinikv ({args.quantize}) against {llama_names}:"),
        (KV_BF16, LLAMA_CPP, "bf16 KV / llama.cpp", f"{KV_BF16} against {llama_names}:"),
        (
            LONG,
            LLAMA_CPP,
            "long / llama.cpp",
            f"the long-context defaults against {llama_names}, full attention:",
        ),
    )
    for ours, reference, names, title in tables:
        if ours in results and reference in results:
            print(f"\n{title}")
            ratio_table(results[ours]["rows"], results[reference]["rows"], names)
    print(
        "RSS MB once loaded / peak: "
        + ", ".join(f"{e} {r['loaded_rss_mb']:.0f} / {r['peak_rss_mb']:.0f}" for e, r in results.items())
    )
    suffix = args.dtype + ("" if args.quantize == "none" else f"-{args.quantize}")
    suffix += "-long-context" if args.long_context or LONG in engines else ""
    suffix += "-kv-bf16" if KV_BF16 in engines else ""
    suffix += f"-{max(args.lengths)}" if args.engines else ""
    out_path = Path(__file__).parent / "results" / f"generate-{suffix}.json"
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
