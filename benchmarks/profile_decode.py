"""Where a decode step's time goes, against the time it takes to read the weights once.

    python benchmarks/profile_decode.py [--quantize none|bf16|int4] [--prompt 512] [--steps 128]
        [--layer-by-layer] [--kv-dtype float32|bfloat16]

One greedy generation of --steps tokens after a --prompt-token prompt (plain attention, the
default model), every decoder part timed by wrappers around it (a perf_counter pair each,
~1 us against a step of tens of ms): the layers' work before attention (norm and q/k/v
projection), attention, the work after it (output projection, norm, MLP, residuals), the
output head, the rest of the forward (embedding, page bookkeeping, Python between the
parts) and the rest of the step outside the forward (sampling, detokenizing, the loop); with
the CPU decoder stack (the default for float32 and bf16 weights), every layer's work is one C
call, timed as a whole (--layer-by-layer: without the stack, each part timed). The
weight-read bound is the bytes of weights a step reads (every layer's and the head's)
over the read bandwidth measured here (a sum over 1 GiB, the best of five); the read bound
adds the keys and values the step's attention reads (the mean context over the steps, in
the pool's dtype). Prints the CPU and its features, a table, and appends a row to
benchmarks/results/profile_decode.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import prompt_ids  # noqa: E402
from benchmarks.machine import append_record  # noqa: E402
from infinikv.model.linear import QUANTIZATIONS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "profile_decode.jsonl"
PARTS = ("decoder stack", "before attention", "attention", "after attention", "output head")


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second a sum over a `gib` GiB float32 tensor reads, the best of `repeats`."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every layer's tensors as the few-row kernels
    read them (an int4 layer's Q4 blocks, not its copy for torch's kernel) and the head's (the
    tied embedding, when there is no head of its own)."""

    def size(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    layers = sum(size(t) for layer in model.layers for t in layer.stack_weights())
    head = model.embed if model.lm_head is None else model.lm_head.kernel_weight
    return layers + size(head)


class Timers:
    """Seconds per part, summed over the calls made while `on`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner: object, name: str, part: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def timed(*args, **kwargs):
            if not self.on:
                return real(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0

        setattr(owner, name, timed)


def profile(args: argparse.Namespace) -> dict:
    from infinikv.engine.sampling import SamplingParams
    from infinikv.model import llama
    from infinikv.model.llama import DecoderLayer, LlamaModel
    from infinikv.service.runtime import build_generator
    from infinikv.service.settings import Settings

    gen = build_generator(Settings(quantize=args.quantize, long_context=False, kv_dtype=args.kv_dtype))
    model = gen.model
    if args.layer_by_layer and model.few_rows is not None:
        model.use_few_rows(dataclasses.replace(model.few_rows, stack=None))
    timers = Timers()
    timers.wrap(LlamaModel, "_run_stack", "decoder stack")
    timers.wrap(DecoderLayer, "attention_input", "before attention")
    timers.wrap(LlamaModel, "_attend", "attention")
    timers.wrap(DecoderLayer, "finish", "after attention")
    timers.wrap(LlamaModel, "forward", "forward")
    if model.lm_head is None:
        timers.wrap(llama, "dense", "output head")  # the forward calls it only for the tied head
    else:
        timers.wrap(model.lm_head, "forward", "output head")
    params = SamplingParams(max_tokens=args.steps, ignore_eos=True)
    ids = prompt_ids(gen.tokenizer, args.prompt)
    gen.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    timers.on = True
    gen.generate(ids, SamplingParams(max_tokens=1))  # the prefill alone: its parts are subtracted
    prefill = dict(timers.seconds)
    result = gen.generate(ids, params)
    timers.on = False
    steps = len(result.token_ids) - 1
    decode = {part: timers.seconds[part] - 2 * prefill.get(part, 0.0) for part in (*PARTS, "forward")}
    step_s = result.decode_seconds / steps
    bandwidth = read_bandwidth_gbs()
    nbytes = weight_bytes(model)
    pool, context = gen.pool, args.prompt + steps / 2  # keys and values read per step, on average
    kv_bytes = 2 * context * model.cfg.num_layers * pool.k[0, 0, 0].numel() * pool.k.element_size()
    return {
        "quantize": args.quantize,
        "kv_dtype": str(pool.k.dtype).removeprefix("torch."),
        "layer_by_layer": args.layer_by_layer,
        "prompt_tokens": args.prompt,
        "steps": steps,
        "step_ms": step_s * 1e3,
        "weight_mb": nbytes / 2**20,
        "read_gbs": bandwidth,
        "bound_ms": nbytes / bandwidth / 1e6,
        "kv_mb": kv_bytes / 2**20,
        "read_bound_ms": (nbytes + kv_bytes) / bandwidth / 1e6,
        "parts_ms": {part: decode[part] / steps * 1e3 for part in PARTS},
        "forward_ms": decode["forward"] / steps * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", choices=QUANTIZATIONS, default="none")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--layer-by-layer", action="store_true", help="without the CPU decoder stack")
    ap.add_argument(
        "--kv-dtype", choices=["float32", "bfloat16"], help="the KV pages' (default: the model's)"
    )
    row = append_record(RESULTS, profile(ap.parse_args()))
    print(f"CPU: {row['cpu']} ({', '.join(row['features'])}); quantize={row['quantize']}, ", end="")
    print(f"KV pages {row['kv_dtype']}, ", end="")
    print(f"{row['prompt_tokens']}-token prompt, {row['steps']} steps, ", end="")
    print("layer by layer" if row["layer_by_layer"] else "decoder stack where it applies")
    print("| part | ms per step | share |\n|---|---:|---:|")
    parts = dict(row["parts_ms"])
    parts["rest of the forward"] = row["forward_ms"] - sum(parts.values())
    parts["outside the forward (sampling, detokenizing, loop)"] = row["step_ms"] - row["forward_ms"]
    for part, ms in parts.items():
        if part in PARTS and not ms:
            continue
        print(f"| {part} | {ms:.2f} | {ms / row['step_ms']:.0%} |")
    print(f"| **step** | **{row['step_ms']:.2f}** | 100% |")
    print(
        f"weights read per step {row['weight_mb']:.0f} MB at {row['read_gbs']:.1f} GB/s: bound "
        f"{row['bound_ms']:.2f} ms, the step at {row['bound_ms'] / row['step_ms']:.0%} of it; with the "
        f"{row['kv_mb']:.0f} MB of keys and values its attention reads: {row['read_bound_ms']:.2f} ms, "
        f"the step at {row['read_bound_ms'] / row['step_ms']:.0%}"
    )


if __name__ == "__main__":
    main()
