"""Decode attention over a cold KV cache vs a plain read of the same bytes, per layer.

    python benchmarks/bench_attention.py [--lengths 2048 6144]

SmolLM2-135M's shapes (9 query heads, 3 kv-heads, head_dim 64), 30 distinct layers' caches
so each read comes from memory, not cache. Compares infinikv's decode path (`attend`, two
batched matmuls), torch SDPA with GQA, and `sum()` over K and V (the bandwidth floor).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from infinikv.attention.paged_torch import attend

LAYERS, HQ, HKV, D = 30, 9, 3, 64


def per_layer_us(fn, caches, repeats: int = 10) -> float:
    for k, v in caches[:3]:
        fn(k, v)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for k, v in caches:
            fn(k, v)
    return (time.perf_counter() - t0) / (repeats * len(caches)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144])
    args = ap.parse_args()
    q = torch.randn(1, HQ, D)
    print(f"threads={torch.get_num_threads()}  per-layer microseconds (ratio to a plain read of K and V)")
    for T in args.lengths:
        caches = [(torch.randn(T, HKV, D), torch.randn(T, HKV, D)) for _ in range(LAYERS)]
        pos = torch.tensor([T - 1])
        read = per_layer_us(lambda k, v: (k.sum(), v.sum()), caches)
        ours = per_layer_us(lambda k, v, pos=pos: attend(q, k, v, pos), caches)
        sdpa = per_layer_us(
            lambda k, v: F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], enable_gqa=True
            ),
            caches,
        )
        print(
            f"T={T:>6}: read {read:7.1f}   attend {ours:7.1f} ({ours / read:.1f}x)   "
            f"sdpa {sdpa:7.1f} ({sdpa / read:.1f}x)"
        )


if __name__ == "__main__":
    main()
