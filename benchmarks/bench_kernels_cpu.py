"""CPU: the C kernels (`--attention-backend cpu`) vs the PyTorch path, per decode step:
attention (every layer once) at 512 to 32k tokens of context, and the projections.

    python benchmarks/bench_kernels_cpu.py [--parts attention projections layers]
        [--lengths 512 2048 6144 16384 32768] [--queries 1 5] [--shapes SmolLM2-135M] [--repeats 15]
        [--weights float32 bfloat16 int4] [--rows 1 5 8 17 32]

Part `attention`:
Shapes: SmolLM2-135M's attention (30 layers, 9 query heads, 3 kv-heads, head_dim 64) and
Llama-3-8B's for head_dim 128 (32 layers, 32 / 8 heads), float32, 16-token pages in one
contiguous run (the PyTorch path reads them as a view, its best case). Rows: one query (a
decode step) and five (a speculative verification of four drafts); `--queries 512`: a
prefill chunk, the PyTorch path torch's fused flash kernel. Times are medians of
--repeats steps, in ms; "GB/s" is the keys and values read per step over the kernel's time,
"GFLOP/s" the products of the causal scores and values over it.
Part `projections`: every weight matrix of one forward (SmolLM2-135M's 30 layers and its
tied 49152-token head; Qwen2.5-0.5B's 24 layers and 151936-token head), float32, bfloat16
(`--quantize bf16`) and int4 (`--quantize int4`: Q4 layers, a Q8 head), applied to 1, 5, 8,
17 and 32 float32 rows (float32 weights also 64 and 128): the C kernel
(`infinikv.kernels.cpu.ops.linear`) vs the PyTorch path (`infinikv.model.linear.dense`
without a kernel: `F.linear`, for bfloat16 weights on the rows rounded to bfloat16; for int4
torch's int4 kernel on bfloat16 rows); "GB/s" is the weights the kernel reads over its time.
Part `layers`: the same models' decoder layers around attention (norm, q/k/v projection;
output projection, norm, MLP, residuals; every layer once, random weights) at 1 and 5 rows,
three ways: the plain PyTorch path; the projections through the C kernel and the rest in
PyTorch operations (`DecoderLayer` with only `FewRowKernels.linear`, the kernels before the
fused parts); and the fused parts (`norm_project`, `mlp_residual`: one call each per layer).
Writes benchmarks/results/kernels_cpu.json (a part not run keeps its last results there).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from infinikv.attention.cpu import cpu_causal_attention
from infinikv.attention.pytorch import paged_causal_attention
from infinikv.cache.pages import PageList, PagePool
from infinikv.core.config import ModelConfig, RopeConfig
from infinikv.core.rope import RotaryEmbedding
from infinikv.kernels.cpu.ops import linear, weight_shape
from infinikv.model.linear import DenseLinear, Int4Linear, Int8Linear, dense, few_row_kernels
from infinikv.model.llama import DecoderLayer

PAGE = 16
SHAPES = {  # name: (layers, query heads, kv-heads, head_dim)
    "SmolLM2-135M": (30, 9, 3, 64),
    "Llama-3-8B": (32, 32, 8, 128),
}
# name: (layers, hidden, q heads, kv-heads, head_dim, intermediate, vocab)
MODELS = {
    "SmolLM2-135M": (30, 576, 9, 3, 64, 1536, 49152),
    "Qwen2.5-0.5B": (24, 896, 14, 2, 64, 4864, 151936),
}
WEIGHTS = ("float32", "bfloat16", "int4")
RESULTS = Path(__file__).parent / "results" / "kernels_cpu.json"


def step_ms(attention, pool: PagePool, pages: PageList, q: torch.Tensor, T: int, rope, repeats: int) -> float:
    """Median ms of one step: every layer's attention of q over T cached tokens."""
    n = q.shape[0]
    positions = torch.arange(T - n, T)
    layers = [pool.layer(i) for i in range(pool.k.shape[0])]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for kv in layers:
            attention(q, positions, kv, pages, T, rope)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])  # the first warms up


def attention_rows(lengths: list[int], queries: list[int], shapes: list[str], repeats: int) -> list[dict]:
    rows = []
    print("| shape | context | queries | PyTorch ms | kernel ms | speed-up | kernel GB/s | kernel GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in shapes:
        L, Hq, Hkv, d = SHAPES[name]
        rope = RotaryEmbedding(RopeConfig(theta=10000.0), d)
        for T in lengths:
            pool = PagePool.for_tokens(T, PAGE, num_layers=L, num_kv_heads=Hkv, head_dim=d, rope=rope)
            pool.k_rope.normal_()
            pool.v.normal_()
            n_pages = -(-T // PAGE)
            ids = list(range(1, n_pages + 1))
            pages = PageList.of(ids, list(range(n_pages)), PAGE, torch.device("cpu"))
            for n in (n for n in queries if n <= T):
                q = torch.randn(n, Hq, d)
                ref = step_ms(paged_causal_attention, pool, pages, q, T, rope, repeats)
                ours = step_ms(cpu_causal_attention, pool, pages, q, T, rope, repeats)
                gbs = 2 * L * T * Hkv * d * 4 / ours / 1e6
                gflops = 4 * L * Hq * n * (T - (n - 1) / 2) * d / ours / 1e6
                rows.append(
                    dict(
                        shape=name,
                        context=T,
                        queries=n,
                        torch_ms=ref,
                        kernel_ms=ours,
                        kernel_gb_s=gbs,
                        kernel_gflop_s=gflops,
                    )
                )
                print(
                    f"| {name} | {T} | {n} | {ref:.2f} | {ours:.2f} | {ref / ours:.2f}x | {gbs:.1f} "
                    f"| {gflops:.0f} |"
                )
            del pool
    return rows


def attention_key(row: dict) -> tuple:
    return row["shape"], row["context"], row["queries"]


def projection_sets(L: int, D: int, Hq: int, Hkv: int, d: int, inter: int, vocab: int):
    """(format, [(the PyTorch path's call, the weight the kernel reads)] for every matrix of
    a forward) for float32, bfloat16 and int4 weights (Q4 layers, a Q8 head)."""
    shapes = [((Hq + 2 * Hkv) * d, D), (D, Hq * d), (2 * inter, D), (D, inter)] * L + [(vocab, D)]
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(n, k).to(dtype) for n, k in shapes]
        yield str(dtype).removeprefix("torch."), [(functools.partial(dense, weight=w), w) for w in weights]
    modules = [Int4Linear(DenseLinear.of(torch.randn(n, k))) for n, k in shapes[:-1]]
    modules.append(Int8Linear(torch.randn(*shapes[-1])))
    yield "int4", [(m, m.kernel_weight) for m in modules]


def projection_rows(repeats: int, weights: list[str], row_counts: list[int] | None) -> list[dict]:
    rows = []
    print("| model | weights | rows | PyTorch ms | kernel ms | speed-up | kernel GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, dims in MODELS.items():
        for kind, matrices in projection_sets(*dims):
            if kind not in weights:
                continue
            nbytes = sum(w.numel() * w.element_size() for _, w in matrices)
            # float32's few-row limit is 64 rows (FEW_ROWS): the rows around it too
            for m in row_counts or (1, 5, 8, 17, 32, *((64, 128) if kind == "float32" else ())):
                inputs = {k: torch.randn(m, k) for k in {weight_shape(w)[1] for _, w in matrices}}
                times = {}
                for label in ("torch", "kernel"):
                    samples = []
                    for _ in range(repeats + 1):
                        t0 = time.perf_counter()
                        for call, w in matrices:
                            x = inputs[weight_shape(w)[1]]
                            call(x) if label == "torch" else linear(x, w)
                        samples.append((time.perf_counter() - t0) * 1e3)
                    times[label] = statistics.median(samples[1:])
                ref, ours = times["torch"], times["kernel"]
                rows.append(
                    dict(
                        model=name,
                        weights=kind,
                        rows=m,
                        torch_ms=ref,
                        kernel_ms=ours,
                        kernel_gb_s=nbytes / ours / 1e6,
                    )
                )
                print(
                    f"| {name} | {kind} | {m} | {ref:.1f} | {ours:.1f} | {ref / ours:.2f}x "
                    f"| {nbytes / ours / 1e6:.1f} |"
                )
            del matrices
    return rows


def decoder_layers(name: str, dtype: torch.dtype) -> list[DecoderLayer]:
    """MODELS[name]'s decoder layers with random weights (projections in `dtype`)."""
    L, D, Hq, Hkv, d, inter, vocab = MODELS[name]
    cfg = ModelConfig(name, vocab, D, inter, L, Hq, Hkv, d, 1e-5, 4096, RopeConfig(theta=10000.0))
    layers = [DecoderLayer(cfg) for _ in range(L)]
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() == 2 else 1.0)
        for m in layer.modules():
            if isinstance(m, DenseLinear):
                m.weight = torch.nn.Parameter(m.weight.to(dtype), requires_grad=False)
    return layers


@torch.inference_mode()
def layer_rows(repeats: int) -> list[dict]:
    kernels = few_row_kernels("cpu")
    rows = []
    print(
        "| model | weights | rows | PyTorch ms | kernel projections ms | fused parts ms "
        "| fused vs kernel projections |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, dtype in itertools.product(MODELS, (torch.float32, torch.bfloat16)):
        layers = decoder_layers(name, dtype)
        L, D, Hq, _, d, _, _ = MODELS[name]
        kind = str(dtype).removeprefix("torch.")
        for m in (1, 5):
            x0, attn = torch.randn(m, D), torch.randn(m, Hq * d)
            times = {}
            for label, linear_kernel, fused in (
                ("torch", None, None),
                ("kernel", kernels.linear, None),
                ("fused", kernels.linear, kernels),
            ):
                for layer in layers:
                    for mod in layer.modules():
                        if isinstance(mod, DenseLinear):
                            mod.few_rows = linear_kernel
                samples = []
                for _ in range(repeats + 1):
                    x = x0.clone()
                    t0 = time.perf_counter()
                    for layer in layers:
                        layer.attention_input(x, 1e-5, fused)
                        x = layer.finish(x, attn, 1e-5, fused)
                    samples.append((time.perf_counter() - t0) * 1e3)
                times[label] = statistics.median(samples[1:])
            row = dict(model=name, weights=kind, rows=m, **{f"{k}_ms": v for k, v in times.items()})
            rows.append(row)
            print(
                f"| {name} | {kind} | {m} | {times['torch']:.1f} | {times['kernel']:.1f} | "
                f"{times['fused']:.1f} | {times['kernel'] / times['fused']:.2f}x |"
            )
        del layers
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=["attention", "projections", "layers"],
        default=["attention", "projections", "layers"],
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 6144, 16384, 32768])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 5], help="attention: query rows")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="attention")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS), help="projections")
    ap.add_argument("--rows", type=int, nargs="+", help="projections: rows of x")
    args = ap.parse_args()
    # The parts not run this time keep their last results, attention its other rows.
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if "attention" in args.parts:
        new = attention_rows(args.lengths, args.queries, args.shapes, args.repeats)
        measured = {attention_key(r) for r in new}  # earlier rows of other shapes and rows stay
        results["attention"] = [
            r for r in results.get("attention", []) if attention_key(r) not in measured
        ] + new
    if "projections" in args.parts:
        results["projections"] = projection_rows(args.repeats, args.weights, args.rows)
    if "layers" in args.parts:
        results["layers"] = layer_rows(args.repeats)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
