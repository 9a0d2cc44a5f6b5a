"""Attention per layer on CPU: decode over a cold KV cache vs a plain read of the same bytes,
a long-context prefill chunk's Self-Extend attention vs its plain-PyTorch reference, and a
decode step's memory-block ranking over the key sketch vs the plain-PyTorch path.

    python benchmarks/bench_attention.py [--lengths 2048 6144] [--parts decode prefill sketch]

SmolLM2-135M's shapes (9 query heads, 3 kv-heads, head_dim 64).
Part `decode`: 30 distinct layers' caches so each read comes from memory, not cache.
Compares infinikv's decode path (`attend`, two batched matmuls), torch SDPA with GQA, and
`sum()` over K and V (the bandwidth floor).
Part `prefill`: a 512-query chunk at the end of N resident tokens with the default
long-context settings (W=2048, G=4): `banded_resident_partials` (fused flash kernel on
every run of keys, the near/far band masked) vs `resident_partials` (the masked softmax in
plain PyTorch, the reference the tests hold it to), and the band alone both ways.
Part `sketch`: `KeySketch.block_scores` over N evicted tokens for one decode step (3
kv-heads x 3 query heads, 16 channels), per layer over 30 layers' sketches: the 8-bit sketch
through fbgemm's quantized embedding bag vs the plain path on the same sketch (gather the
picked rows, de-quantize, bmm: `gathered_logits`), and vs the bfloat16 sketch it replaced
(one embedding_bag over bfloat16 keys).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from infinikv.attention.pytorch import attend, band_bounds, banded_resident_partials
from infinikv.core.config import RopeConfig
from infinikv.core.partial import flash_partial, reference_partial
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.core.self_extend import SelfExtend, resident_partials
from infinikv.memory.sketch import KeySketch, gathered_logits

LAYERS, HQ, HKV, D = 30, 9, 3, 64
CHUNK, WINDOW, GROUP = 512, 2048, 4


def per_layer_us(fn, caches, repeats: int = 10) -> float:
    for k, v in caches[:3]:
        fn(k, v)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for k, v in caches:
            fn(k, v)
    return (time.perf_counter() - t0) / (repeats * len(caches)) * 1e6


def decode(lengths: list[int]) -> None:
    q = torch.randn(1, HQ, D)
    threads = torch.get_num_threads()
    print(f"decode, threads={threads}: per-layer microseconds (ratio to a plain read of K and V)")
    for T in lengths:
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


def ms(fn, repeats: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def prefill_row(T: int, rope: RotaryEmbedding, se: SelfExtend) -> str:
    q = torch.randn(CHUNK, HQ, D)
    k, v = torch.randn(T, HKV, D), torch.randn(T, HKV, D)
    k_pos = torch.arange(T)
    q_pos = k_pos[-CHUNK:]
    k_rope = rotate(k, rope.at(k_pos))
    far_end, near_start = band_bounds(q_pos, k_pos, WINDOW)
    k_group = rotate(k[:near_start], rope.at(se.grouped_key_positions(k_pos[:near_start])))
    args = (q, q_pos, k_group, k_rope[far_end:], v, k_pos, rope, se)
    banded = ms(lambda: banded_resident_partials(*args))
    reference = ms(lambda: resident_partials(q, q_pos, k, k_rope, v, k_pos, rope, se))
    # The band: keys near for some of the chunk's queries and far for the others.
    band = slice(T - CHUNK - WINDOW + 1, T - WINDOW + 1)
    qn, kb, vb = rotate(q, rope.at(q_pos)), k_rope[band], v[band]
    rel = q_pos[:, None] - k_pos[None, band]
    near = (rel >= 0) & (rel < WINDOW)
    fused = ms(lambda: flash_partial(qn, kb, vb, False, near))
    plain = ms(lambda: reference_partial(qn, kb, vb, near))
    return (
        f"N={T:>6}: banded {banded:7.1f}  reference {reference:7.1f} ({reference / banded:.1f}x)   "
        f"band (one placement): fused {fused:6.2f}  plain {plain:6.2f} ({plain / fused:.1f}x)"
    )


def prefill(lengths: list[int]) -> None:
    rope = RotaryEmbedding(RopeConfig(theta=100000.0), D)
    se = SelfExtend(WINDOW, GROUP)
    print(f"prefill chunk of {CHUNK}, W={WINDOW}, G={GROUP}, threads={torch.get_num_threads()}: ms per layer")
    for T in lengths:
        print(prefill_row(T, rope, se))


def bfloat16_block_scores(keys: torch.Tensor, queries: torch.Tensor, r: int, B: int) -> torch.Tensor:
    """The bfloat16 sketch the 8-bit one replaced: keys (Hkv * d, N) bfloat16 of one layer,
    one embedding_bag over the picked rows, then the best per block."""
    H, P, m, d = queries.shape
    picked = queries.abs().sum(2).topk(r, dim=-1).indices[:, :, None].expand(H, P, m, r)
    weights = queries.gather(3, picked).to(torch.bfloat16).view(-1, r)
    rows = (torch.arange(H).view(H, 1, 1, 1) * d + picked).reshape(-1, r)
    logits = F.embedding_bag(rows, keys, mode="sum", per_sample_weights=weights)
    return logits.view(H * P, m, -1).amax(1).view(H * P, -1, B).amax(-1).float().view(H, P, -1)


def sketch_row(N: int) -> str:
    B, r = 16, 16
    keys = torch.randn(LAYERS, N // B, B, HKV, D)
    sketch = KeySketch(LAYERS, HKV, D, B, r)
    sketch.append(keys)
    q = torch.randn(HKV, 1, HQ // HKV, D)
    fused = ms(lambda: [sketch.block_scores(layer, q) for layer in range(LAYERS)]) / LAYERS
    sketch.logits = gathered_logits
    plain = ms(lambda: [sketch.block_scores(layer, q) for layer in range(LAYERS)]) / LAYERS
    rows = keys.permute(0, 3, 4, 1, 2).reshape(LAYERS, HKV * D, N).bfloat16().contiguous()
    before = ms(lambda: [bfloat16_block_scores(rows[layer], q, r, B) for layer in range(LAYERS)]) / LAYERS
    return (
        f"N={N:>6}: 8-bit fused {fused:6.3f}  8-bit plain {plain:6.3f} ({plain / fused:.1f}x)  "
        f"bfloat16 {before:6.3f} ({before / fused:.1f}x)"
    )


def sketch_scores(lengths: list[int]) -> None:
    print(f"sketch ranking for one decode step, threads={torch.get_num_threads()}: ms per layer")
    for N in lengths:
        print(sketch_row(N))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144])
    ap.add_argument(
        "--parts", nargs="+", choices=["decode", "prefill", "sketch"], default=["decode", "prefill", "sketch"]
    )
    args = ap.parse_args()
    if "decode" in args.parts:
        decode(args.lengths)
    if "prefill" in args.parts:
        prefill([T for T in args.lengths if T > WINDOW + CHUNK] or [4096])
    if "sketch" in args.parts:
        sketch_scores(args.lengths)


if __name__ == "__main__":
    main()
