"""CPU: the C attention kernel (`--attention-backend cpu`) vs the PyTorch path, per decode
step (every layer once), at 512 to 32k tokens of context.

    python benchmarks/bench_kernels_cpu.py [--lengths 512 2048 6144 16384 32768] [--repeats 15]

Shapes: SmolLM2-135M's attention (30 layers, 9 query heads, 3 kv-heads, head_dim 64) and
Llama-3-8B's for head_dim 128 (32 layers, 32 / 8 heads), float32, 16-token pages in one
contiguous run (the PyTorch path reads them as a view, its best case). Rows: one query (a
decode step) and five (a speculative verification of four drafts). Times are medians of
--repeats steps, in ms; "GB/s" is the keys and values read per step over the kernel's time.
Writes benchmarks/results/kernels_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from infinikv.attention.paged_cpu import cpu_causal_attention
from infinikv.attention.paged_torch import paged_causal_attention
from infinikv.memory.pages import PageList, PagePool
from infinikv.model.config import RopeConfig
from infinikv.model.rope import RotaryEmbedding

PAGE = 16
SHAPES = {  # name: (layers, query heads, kv-heads, head_dim)
    "SmolLM2-135M": (30, 9, 3, 64),
    "Llama-3-8B": (32, 32, 8, 128),
}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 6144, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rows = []
    print("| shape | context | queries | PyTorch ms | kernel ms | speed-up | kernel GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (L, Hq, Hkv, d) in SHAPES.items():
        rope = RotaryEmbedding(RopeConfig(theta=10000.0), d)
        for T in args.lengths:
            pool = PagePool.for_tokens(T, PAGE, num_layers=L, num_kv_heads=Hkv, head_dim=d, rope=rope)
            pool.k_rope.normal_()
            pool.v.normal_()
            n_pages = -(-T // PAGE)
            ids = list(range(1, n_pages + 1))
            pages = PageList.of(ids, list(range(n_pages)), PAGE, torch.device("cpu"))
            for n in (1, 5):
                q = torch.randn(n, Hq, d)
                ref = step_ms(paged_causal_attention, pool, pages, q, T, rope, args.repeats)
                ours = step_ms(cpu_causal_attention, pool, pages, q, T, rope, args.repeats)
                gbs = 2 * L * T * Hkv * d * 4 / ours / 1e6
                rows.append(
                    dict(shape=name, context=T, queries=n, torch_ms=ref, kernel_ms=ours, kernel_gb_s=gbs)
                )
                print(f"| {name} | {T} | {n} | {ref:.2f} | {ours:.2f} | {ref / ours:.2f}x | {gbs:.1f} |")
            del pool
    RESULTS.write_text(
        json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
