"""GPU: time the Self-Extend kernel over a grid of tile sizes and launch options, to choose
`CHUNK_LAUNCH` and `DECODE_LAUNCH` in infinikv/kernels/self_extend/ops.py for a GPU.

    python benchmarks/sweep_self_extend.py --length 32768

Llama-3-8B attention shapes (32 query heads, 8 kv-heads, head_dim 128), bfloat16, 16-token
pages, W=1024, G=8; one decode position and a 512-query chunk at the end of `length`
resident keys. Each launch is checked against the current default's output (relative
error printed) and timed with `triton.testing.do_bench` (median); prints the fastest six
and the slowest per mode.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from infinikv.cache.pages import PageList
from infinikv.core.config import RopeConfig
from infinikv.core.rope import RotaryEmbedding
from infinikv.core.self_extend import SelfExtend
from infinikv.kernels.self_extend.ops import Launch, self_extend_attention

HQ, HKV, D, PAGE = 32, 8, 128, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=32768)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_self_extend: no CUDA device here")
    length, dtype = args.length, torch.bfloat16
    pages_n = -(-length // PAGE)
    k_pages = torch.randn(pages_n + 1, PAGE, HKV, D, dtype=dtype, device="cuda")
    v_pages = torch.randn_like(k_pages)
    table = PageList.of(list(range(1, pages_n + 1)), list(range(pages_n)), PAGE, torch.device("cuda"))
    rope = RotaryEmbedding(RopeConfig(theta=500000.0), D, device="cuda")
    se = SelfExtend(1024, 8)
    for n in (1, 512):
        q = torch.randn(n, HQ, D, dtype=dtype, device="cuda")
        q_pos = torch.arange(length - n, length, device="cuda")
        call = (q, q_pos, k_pages, v_pages, table, length, rope, se)
        ref = self_extend_attention(*call)[0].float()
        results = []
        block_ms = (16,) if n == 1 else (64, 128)
        for bm, bn, warps, stages in itertools.product(block_ms, (32, 64, 128), (4, 8), (2, 3, 4)):
            launch = Launch(bm, bn, warps, stages)
            try:
                out = self_extend_attention(*call, launch=launch)[0].float()
            except triton.runtime.errors.OutOfResources as e:
                print(f"n={n} {launch}: {e}", flush=True)
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            run = lambda call=call, launch=launch: self_extend_attention(*call, launch=launch)  # noqa: E731
            ms = triton.testing.do_bench(run, return_mode="median")
            results.append((ms, launch, err))
        results.sort(key=lambda r: r[0])
        for ms, launch, err in results[:6] + results[-1:]:
            print(f"n={n} length={length} ms={ms:.3f} {launch} relerr={err:.1e}", flush=True)


if __name__ == "__main__":
    main()
