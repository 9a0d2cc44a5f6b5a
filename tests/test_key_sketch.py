"""Key sketch (SparQ-style approximate logits per block) against brute force, and block
ranking by it in the evicted memory."""

from __future__ import annotations

import torch

from infinikv.memory.evicted import EvictedMemory
from infinikv.memory.sketch import FIRST_SEGMENT_BLOCKS, KeySketch

from .conftest import retrieve_blocks


def brute_force_block_scores(q: torch.Tensor, keys: torch.Tensor, r: int, B: int) -> torch.Tensor:
    """q (H, P, m, d), keys (H, N, d): each group scores on the r channels where the sum of
    its queries' |q| is largest; a block's score is its best logit over tokens and queries."""
    H, P, m, d = q.shape
    scores = torch.empty(H, P, keys.shape[1] // B)
    for h in range(H):
        for p in range(P):
            channels = q[h, p].abs().sum(0).topk(r).indices
            logits = q[h, p][:, channels] @ keys[h][:, channels].T  # (m, N)
            scores[h, p] = logits.amax(0).view(-1, B).amax(-1)
    return scores


def test_block_scores_match_brute_force_across_segments_and_uneven_appends() -> None:
    g = torch.Generator().manual_seed(0)
    L, H, d, B = 2, 3, 8, 2
    nblocks = FIRST_SEGMENT_BLOCKS * 3 + 37  # three segments (256, 256, 512 blocks)
    k = torch.randn(L, nblocks, B, H, d, generator=g).bfloat16().float()  # exact in the sketch
    for r in (3, d):
        sketch = KeySketch(L, H, d, B, channels=r)
        for start, stop in ((0, 5), (5, FIRST_SEGMENT_BLOCKS + 1), (FIRST_SEGMENT_BLOCKS + 1, nblocks)):
            sketch.append(k[:, start:stop])
        assert sketch.tokens == nblocks * B and len(sketch.segments) == 3
        sketch.segments[-1][..., nblocks * B - 2 * FIRST_SEGMENT_BLOCKS * B :] = float("nan")  # unfilled tail
        q = torch.randn(H, 4, 2, d, generator=g).bfloat16().float()  # exact as bfloat16 weights
        for layer in range(L):
            keys = k[layer].permute(2, 0, 1, 3).reshape(H, nblocks * B, d)
            # Summed in float32, rounded once to bfloat16 (8 bits of mantissa).
            torch.testing.assert_close(
                sketch.block_scores(layer, q), brute_force_block_scores(q, keys, r, B), rtol=2**-8, atol=1e-6
            )


def test_sketch_ranking_finds_the_block_a_summary_bound_overrates_another_for() -> None:
    """Block 0 has large channels 0 and 1 on different keys (bound 10, best logit 5); block 1
    one key with both at 4 (logit 8): the bound prefers block 0, the logits block 1."""
    mem = EvictedMemory(1, 1, 4, 2, granularity="block")
    k = torch.zeros(1, 2, 2, 1, 4)
    k[0, 0, 0, 0, 0] = k[0, 0, 1, 0, 1] = 5.0
    k[0, 1, 0, 0, :2] = 4.0
    mem.add_blocks([0, 1], k, torch.randn(1, 2, 2, 1, 4))
    q = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    by_bound, _ = retrieve_blocks(mem, 0, q, max_blocks=1, ranking="bound")
    by_sketch, _ = retrieve_blocks(mem, 0, q, max_blocks=1, ranking="sketch")
    assert torch.equal(by_bound[0, 0], k[0, 0, :, 0]) and torch.equal(by_sketch[0, 0], k[0, 1, :, 0])
