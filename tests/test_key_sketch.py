"""Key sketch (SparQ-style approximate logits per block) against brute force, and block
ranking by it in the evicted memory."""

from __future__ import annotations

import pytest
import torch

from infinikv.kernels.cpu.sketch import sketch_logits
from infinikv.memory.evicted import EvictedMemory, MemorySpec
from infinikv.memory.favourites import FAVOURITES_PER_BLOCK
from infinikv.memory.sketch import (
    KeySketch,
    dequantize_rows,
    dequantized_logits,
    fused_logits,
    gathered_logits,
)

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


def grid_keys(L: int, nblocks: int, B: int, H: int, d: int, chunk: int, g: torch.Generator) -> torch.Tensor:
    """Keys (L, nblocks, B, H, d) that 8 bits hold exactly: each channel's keys in a chunk of
    tokens are -3 + j/4 for integers j in [0, 255], 0 and 255 among them (step 1/4)."""
    j = torch.randint(0, 256, (L, H, d, nblocks * B), generator=g).float()
    j[..., ::chunk] = 0
    j[..., 1::chunk] = 255
    return (j / 4 - 3).view(L, H, d, nblocks, B).permute(0, 3, 4, 1, 2).contiguous()


@pytest.mark.parametrize("logits", [fused_logits, gathered_logits])
def test_block_scores_match_brute_force_across_chunks_segments_and_uneven_appends(logits) -> None:
    g = torch.Generator().manual_seed(0)
    L, H, d, B, chunk = 2, 3, 8, 2, 8
    nblocks = (4 * 4 + 2) * chunk // B + 1  # 3 segments (4, 4, 8 chunks), then a 4th
    k = grid_keys(L, nblocks, B, H, d, chunk, g)
    for r in (3, d):
        sketch = KeySketch(L, H, d, B, channels=r, chunk_tokens=chunk, first_segment=4)
        sketch.logits = logits
        for start, stop in ((0, 5), (5, 6), (6, 23), (23, nblocks)):  # within, across chunks and segments
            sketch.append(k[:, start:stop])
        assert sketch.tokens == nblocks * B and [s.shape[1] for s in sketch.segments] == [4, 4, 8, 16]
        sketch.segments[-1][:, 3:] = 255  # chunks not filled yet: NaN steps
        q = torch.randn(H, 4, 2, d, generator=g).bfloat16().float()
        for layer in range(L):
            keys = k[layer].permute(2, 0, 1, 3).reshape(H, nblocks * B, d)
            # Summed in float32, rounded once to bfloat16 (8 bits of mantissa).
            torch.testing.assert_close(
                sketch.block_scores(layer, q), brute_force_block_scores(q, keys, r, B), rtol=2**-8, atol=1e-6
            )


@pytest.mark.parametrize("scorer", [dequantized_logits, sketch_logits])
@pytest.mark.parametrize("d, m", [(64, 1), (64, 3), (128, 9), (64, 6)])
def test_token_logits_equal_exact_logits_across_chunks_and_segments(scorer, d: int, m: int) -> None:
    """Every channel of every evicted key: on keys 8 bits hold exactly, the approximate logits
    are the exact ones (to float32 rounding), through the C kernel and its PyTorch reference;
    the tail of a part-filled chunk never leaks."""
    g = torch.Generator().manual_seed(d + m)
    L, H, B, chunk = 2, 3, 16, 64
    nblocks = (2 + 2 + 4) * chunk // B + 3  # segments of 2, 2, 4 chunks, then part of a fourth
    k = grid_keys(L, nblocks, B, H, d, chunk, g)
    sketch = KeySketch(L, H, d, B, channels=16, chunk_tokens=chunk, first_segment=2)
    sketch.token_scorer = scorer
    for start, stop in ((0, 3), (3, 9), (9, 30), (30, nblocks)):
        sketch.append(k[:, start:stop])
    sketch.segments[-1][:, 1:, :, :-8] = 255  # unwritten bytes of the last segment
    q = torch.randn(H, m, d, generator=g)
    for layer in range(L):
        keys = k[layer].permute(2, 0, 1, 3).reshape(H, nblocks * B, d)
        exact = torch.bmm(q, keys.transpose(1, 2))
        # min * q + step * (q . u) rounds apart from q . k: a few float32 ulps of sum |q_c k_c|
        bound = 8 * 2**-24 * torch.bmm(q.abs(), keys.abs().transpose(1, 2))
        assert ((sketch.token_logits(layer, q) - exact).abs() <= bound).all()


def test_the_sketch_kernel_refuses_what_it_cannot_run() -> None:
    table = torch.zeros(2, 3 * 64, 64 + 8, dtype=torch.uint8)
    q = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match="holding 129 tokens"):
        sketch_logits(table, 2, 129, q)
    with pytest.raises(ValueError, match="float32 queries"):
        sketch_logits(table, 2, 100, q.double())
    with pytest.raises(ValueError, match="C a multiple of 64"):
        sketch_logits(torch.zeros(2, 3 * 64, 40, dtype=torch.uint8), 2, 60, q)


def test_every_chunk_holds_its_keys_within_half_its_own_step() -> None:
    """Each chunk's keys far from the others', the last chunk partly filled: every row of a
    chunk is quantized over its own keys' range (not the padding's, not an earlier chunk's)."""
    g = torch.Generator().manual_seed(3)
    L, H, d, B, chunk = 2, 2, 8, 2, 64
    nblocks = 2 * chunk // B + 25
    offsets = 100 * (torch.arange(nblocks * B) // chunk).view(1, nblocks, B, 1, 1)
    k = offsets + torch.randn(L, nblocks, B, H, d, generator=g)
    sketch = KeySketch(L, H, d, B, channels=1, chunk_tokens=chunk)
    sketch.append(k[:, :7])
    sketch.append(k[:, 7:])
    n = nblocks * B
    held = torch.cat([dequantize_rows(s) for s in sketch.segments], 1).transpose(1, 2).flatten(2)[..., :n]
    keys = k.permute(0, 3, 4, 1, 2).reshape(L, H * d, n)
    chunks = torch.nn.functional.pad(keys, (0, -n % chunk), value=torch.nan).unflatten(-1, (-1, chunk))
    step = (chunks.nan_to_num(-torch.inf).amax(-1) - chunks.nan_to_num(torch.inf).amin(-1)) / 255
    assert ((held - keys).abs() <= step.repeat_interleave(chunk, -1)[..., :n] * 0.5001).all()


def test_appends_in_any_split_give_the_same_sketch() -> None:
    """A memory reloaded from its store appends its blocks in other batches than eviction did."""
    g = torch.Generator().manual_seed(4)
    L, H, d, B, chunk = 2, 2, 8, 2, 8
    k = torch.randn(L, 41, B, H, d, generator=g)
    one, many = (KeySketch(L, H, d, B, channels=3, chunk_tokens=chunk) for _ in range(2))
    one.append(k)
    for start in range(0, 41, 3):
        many.append(k[:, start : start + 3])
    q = torch.randn(H, 2, 2, d, generator=g)
    for layer in range(L):
        assert torch.equal(one.block_scores(layer, q), many.block_scores(layer, q))


def test_sketch_ranking_finds_the_block_a_summary_bound_overrates_another_for() -> None:
    """Block 0 has large channels 0 and 1 on different keys (bound 10, best logit 5); block 1
    one key with both at 4 (logit 8): the bound prefers block 0, the logits block 1."""
    mem = EvictedMemory(MemorySpec(1, 1, 4, 2, granularity="block"))
    k = torch.zeros(1, 2, 2, 1, 4)
    k[0, 0, 0, 0, 0] = k[0, 0, 1, 0, 1] = 5.0
    k[0, 1, 0, 0, :2] = 4.0
    mem.add_blocks([0, 1], k, torch.randn(1, 2, 2, 1, 4))
    q = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    by_bound, _ = retrieve_blocks(mem, 0, q, max_blocks=1, ranking="bound")
    by_sketch, _ = retrieve_blocks(mem, 0, q, max_blocks=1, ranking="sketch")
    assert torch.equal(by_bound[0, 0], k[0, 0, :, 0]) and torch.equal(by_sketch[0, 0], k[0, 1, :, 0])


def block_memory(k: torch.Tensor, every: int, channels: int = 2) -> EvictedMemory:
    """A block-granular memory of keys k (L, n, B, 1, d) whose values name their block
    (every value channel of block b is b), so what a selection reads says which blocks."""
    L, n, B, _, d = k.shape
    mem = EvictedMemory(
        MemorySpec(L, 1, d, B, granularity="block", sketch_channels=channels, sketch_every=every)
    )
    mem.add_blocks(list(range(n)), k, block_values(L, 0, n, B, d))
    return mem


def block_values(L: int, first: int, n: int, B: int, d: int) -> torch.Tensor:
    return torch.arange(first, first + n).float().view(1, n, 1, 1, 1).expand(L, n, B, 1, d).clone()


def selected(mem: EvictedMemory, layer: int, q: torch.Tensor, nb: int, position: int = 0) -> list[set[int]]:
    """Blocks each position of q (1, P, m, d), the first at `position`, selects."""
    _, v = retrieve_blocks(mem, layer, q, nb, "sketch", position)  # (1, P, nb * B, d)
    return [set(v[0, p, :, 0].int().tolist()) for p in range(q.shape[1])]


def query(*channels: float) -> torch.Tensor:
    """One position's one query head (Hkv=1, P=1, m=1, d)."""
    return torch.tensor(channels).view(1, 1, 1, -1)


def exact_best(q: torch.Tensor, k: torch.Tensor, candidates: list[int], nb: int) -> set[int]:
    """The nb of candidate blocks with the best logit for one group q (m, d), k (n, B, d):
    logits rounded to bfloat16, ties to the earlier candidate."""
    logits = torch.einsum("md,nbd->nmb", q, k).amax(dim=(1, 2))[candidates].bfloat16().float()
    return {candidates[i] for i in logits.argsort(descending=True, stable=True)[:nb].tolist()}


def test_positions_pick_by_exact_logits_among_their_last_full_rankings_favourites_and_later_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    B, d, nb, n = 2, 8, 2, 40
    k = torch.randn(1, n, B, 1, d, generator=g)
    mem = block_memory(k, every=4)
    q = torch.randn(1, 1, 2, d, generator=g)
    favourites = mem.sketch.block_scores(0, q)[0, 0].topk(FAVOURITES_PER_BLOCK * nb).indices.tolist()
    assert selected(mem, 0, q, nb) == [exact_best(q[0, 0], k[0, :, :, 0], favourites, nb)]  # full at 0
    fresh = torch.randn(1, 1, B, 1, d, generator=g)
    mem.add_blocks([n], fresh, block_values(1, n, 1, B, d))  # evicted after that ranking
    k = torch.cat([k, fresh], 1)
    candidates = [*favourites, n]
    for position in (1, 2):  # favourites and the fresh block only
        other = torch.randn(1, 1, 2, d, generator=g)
        exact = exact_best(other[0, 0], k[0, :, :, 0], candidates, nb)
        assert selected(mem, 0, other, nb, position) == [exact]
        assert exact != exact_best(other[0, 0], k[0, :, :, 0], list(range(n + 1)), nb)  # all would differ


def test_a_layer_ranks_in_full_at_one_position_in_sketch_every_staggered_by_layer() -> None:
    """Block 29 is the worst for the first query and the best for the next: positions over
    the first one's favourites miss it; a layer's next full ranking finds it."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 30, 2, 1, 4, generator=g)
    k[:, 29] = 0
    k[:, 29, 0, 0, 0] = 100.0
    mem = block_memory(k, every=3, channels=4)
    away, toward = query(-1.0, 1, 1, 1), query(1.0, 0, 0, 0)
    for layer in (0, 1):
        assert 29 not in selected(mem, layer, away, 1)[0]  # position 0: full (nothing to reuse)
    found = {layer: [29 in selected(mem, layer, toward, 1, p)[0] for p in range(1, 6)] for layer in (0, 1)}
    # Position p is full for layer l when (p + l) % 3 == 0: layer 0 at 3, layer 1 at 2.
    assert found == {0: [False, False, True, True, True], 1: [False, True, True, True, True]}


def test_a_memory_grown_by_max_blocks_since_its_last_full_ranking_is_ranked_in_full() -> None:
    k = torch.zeros(1, 10, 2, 1, 4)
    k[0, :, :, 0, 1] = 1.0
    k[0, 3, 0, 0, 0] = 100.0  # best for `toward` only
    mem = block_memory(k, every=100, channels=4)
    away, toward = query(-1.0, 1, 0, 0), query(1.0, 0, 0, 0)
    assert selected(mem, 0, away, 1, 1) != [{3}]
    assert selected(mem, 0, toward, 1, 2) != [{3}]  # favourites only
    mem.add_blocks([10], torch.zeros(1, 1, 2, 1, 4), block_values(1, 10, 1, 2, 4))
    assert selected(mem, 0, toward, 1, 3) == [{3}]  # grown by max_blocks = 1: full


def test_selections_depend_on_positions_not_on_forwards_nor_on_rejected_drafts() -> None:
    """A speculative decode's forwards (several positions each, drafts rejected and their
    positions fed again, evictions between forwards) select for each position what plain
    decoding (one position per forward) selects: favourites are a function of position."""
    g = torch.Generator().manual_seed(5)
    L, n, B, H, m, d, nb = 2, 60, 2, 2, 2, 8, 2
    k = torch.randn(L, n + 2, B, H, d, generator=g)
    v = torch.arange(n + 2).float().view(1, -1, 1, 1, 1).expand(L, -1, B, H, d).contiguous()
    queries = torch.randn(30, H, m, d, generator=g)  # the accepted position's queries
    evict_before = {9: n, 17: n + 1}  # a block evicted before positions 9 and 17

    def picks(mem: EvictedMemory, layer: int, first: int, q: torch.Tensor) -> list[list[set[int]]]:
        _, values = retrieve_blocks(mem, layer, q.transpose(0, 1), nb, "sketch", first)  # (H, P, nb * B, d)
        return [[set(values[h, p, :, 0].int().tolist()) for h in range(H)] for p in range(q.shape[0])]

    plain, speculative = (
        EvictedMemory(MemorySpec(L, H, d, B, granularity="block", sketch_every=4)) for _ in range(2)
    )
    for mem in (plain, speculative):
        mem.add_blocks(list(range(n)), k[:, :n], v[:, :n])
    want = {}
    for position in range(30):
        if position in evict_before:
            b = evict_before[position]
            plain.add_blocks([b], k[:, b : b + 1], v[:, b : b + 1])
        for layer in range(L):
            want[layer, position] = picks(plain, layer, position, queries[position : position + 1])[0]
    # (first position, positions fed, of which accepted): a rejected draft's position is fed
    # again, with other queries first; forwards split where plain decoding evicts.
    forwards = [(0, 5, 3), (3, 6, 6), (9, 7, 2), (11, 6, 4), (15, 2, 2), (17, 9, 5), (22, 8, 8)]
    got = {}
    for first, fed, accepted in forwards:
        if first in evict_before:
            b = evict_before[first]
            speculative.add_blocks([b], k[:, b : b + 1], v[:, b : b + 1])
        q = torch.cat([queries[first : first + accepted], torch.randn(fed - accepted, H, m, d, generator=g)])
        for layer in range(L):
            for p, chosen in enumerate(picks(speculative, layer, first, q)[:accepted]):
                got[layer, first + p] = chosen
    assert got == want
