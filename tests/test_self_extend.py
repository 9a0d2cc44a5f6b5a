"""Self-Extend + memory attention identities on random tiny shapes (plain-torch oracles)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from infinikv.attention.pytorch import attend
from infinikv.core.config import ModelConfig
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.core.self_extend import SelfExtend, long_context_attention

D_HEAD = 16


@pytest.fixture(scope="module")
def rope() -> RotaryEmbedding:
    cfg = ModelConfig.from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4))
    return RotaryEmbedding(cfg.rope, D_HEAD)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def longlm_oracle(q, q_pos, k, v, k_pos, rope, W, G):
    """LongLM's formula, written directly: two full score matrices, a mask picks per (i, j)
    the neighbor score (i - j < W) or the grouped one, then one causal softmax."""
    g = q.shape[1] // k.shape[1]
    kr = lambda x, p: rotate(x, rope.at(p)).repeat_interleave(g, 1)  # noqa: E731
    neighbor = torch.einsum("nhd,thd->hnt", rotate(q, rope.at(q_pos)), kr(k, k_pos))
    gq = rotate(q, rope.at(q_pos // G + W - W // G))
    grouped = torch.einsum("nhd,thd->hnt", gq, kr(k, k_pos // G))
    rel = q_pos[:, None] - k_pos[None, :]
    scores = torch.where(rel < W, neighbor, grouped) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(rel < 0, float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v.repeat_interleave(g, 1))


@pytest.mark.parametrize("T,n,Hq,Hkv,W,G", [(63, 63, 4, 2, 16, 4), (50, 1, 6, 3, 7, 3), (41, 9, 4, 1, 40, 2)])
def test_self_extend_equals_longlm_formula(rope, T, n, Hq, Hkv, W, G) -> None:
    q, k, v = rand(n, Hq, D_HEAD, seed=1), rand(T, Hkv, D_HEAD, seed=2), rand(T, Hkv, D_HEAD, seed=3)
    q_pos, k_pos = torch.arange(T - n, T), torch.arange(T)
    out, _ = long_context_attention(q, q_pos, k, v, k_pos, rope, SelfExtend(W, G))
    torch.testing.assert_close(out, longlm_oracle(q, q_pos, k, v, k_pos, rope, W, G), atol=1e-5, rtol=1e-4)


def test_group_one_without_memory_is_plain_causal_attention(rope) -> None:
    T, n = 37, 5
    q, k, v = rand(n, 4, D_HEAD, seed=4), rand(T, 2, D_HEAD, seed=5), rand(T, 2, D_HEAD, seed=6)
    q_pos = torch.arange(T - n, T)
    out, _ = long_context_attention(q, q_pos, k, v, torch.arange(T), rope, SelfExtend(window=8, group=1))
    plain = attend(rotate(q, rope.at(q_pos)), rotate(k, rope.phases(T)), v, q_pos)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)


def test_chunked_prefill_equals_token_by_token(rope) -> None:
    T, W, G = 40, 6, 3
    q, k, v = rand(T, 4, D_HEAD, seed=7), rand(T, 2, D_HEAD, seed=8), rand(T, 2, D_HEAD, seed=9)
    pos = torch.arange(T)
    se = SelfExtend(W, G)
    chunk, _ = long_context_attention(q[25:], pos[25:], k, v, pos, rope, se)
    steps = [
        long_context_attention(q[i : i + 1], pos[i : i + 1], k[: i + 1], v[: i + 1], pos[: i + 1], rope, se)[
            0
        ]
        for i in range(25, T)
    ]
    torch.testing.assert_close(chunk, torch.cat(steps), atol=1e-5, rtol=1e-4)


def test_memory_covering_everything_equals_one_softmax(rope) -> None:
    """Resident keys with sinks and a gap (evicted blocks) plus all evicted keys retrieved
    at distance D == one softmax over every token at its assigned position."""
    Hq, Hkv, n, D, W, G = 4, 2, 3, 50, 8, 2
    g = Hq // Hkv
    k_pos = torch.cat([torch.arange(0, 4), torch.arange(30, 60)])  # sinks + recent window
    evicted = torch.arange(4, 30)
    q_pos = torch.arange(57, 60)
    k_all, v_all = rand(60, Hkv, D_HEAD, seed=10), rand(60, Hkv, D_HEAD, seed=11)
    q = rand(n, Hq, D_HEAD, seed=12)
    se = SelfExtend(W, G)
    # every query head retrieves every evicted entry of its kv-head
    mem_k = k_all[evicted].repeat_interleave(g, 1).permute(1, 0, 2)[None].expand(n, -1, -1, -1)
    mem_v = v_all[evicted].repeat_interleave(g, 1).permute(1, 0, 2)[None].expand(n, -1, -1, -1)
    out, _ = long_context_attention(
        q, q_pos, k_all[k_pos], v_all[k_pos], k_pos, rope, se, memory=(mem_k, mem_v), distance=D
    )
    # Oracle: one score matrix over all 60 tokens, each at its assigned position.
    rel = q_pos[:, None] - torch.arange(60)[None, :]
    kr = lambda p: rotate(k_all, rope.at(p)).repeat_interleave(g, 1)  # noqa: E731
    exact = torch.einsum("nhd,thd->hnt", rotate(q, rope.at(q_pos)), kr(torch.arange(60)))
    grouped = torch.einsum(
        "nhd,thd->hnt", rotate(q, rope.at(se.grouped_query_positions(q_pos))), kr(torch.arange(60) // G)
    )
    mem = torch.einsum("nhd,thd->hnt", rotate(q, rope.at(torch.full((n,), D))), k_all.repeat_interleave(g, 1))
    is_mem = torch.zeros(60, dtype=torch.bool)
    is_mem[evicted] = True
    scores = torch.where(is_mem, mem, torch.where(rel < W, exact, grouped)) / D_HEAD**0.5
    scores = scores.masked_fill(rel < 0, float("-inf"))
    want = torch.einsum("hnt,thd->nhd", scores.softmax(-1), v_all.repeat_interleave(g, 1))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "n,W,G,evicted",
    [
        (1, 8, 3, False),
        (5, 8, 3, True),
        (8, 8, 2, True),
        (3, 40, 4, False),
        (16, 16, 1, True),  # groups of one: every key near, one run (resident_bounds)
        (5, 8, 1, True),
        (7, 30, 5, True),
        (1, 8, 3, True),  # one query (a decode step takes decode_attention instead)
        (1, 30, 4, False),
        (1, 70, 2, False),  # nothing far yet
    ],
)
def test_banded_paged_regions_equal_the_reference(rope, n, W, G, evicted) -> None:
    """The fast split into far / band / near runs == the masked reference."""
    from infinikv.attention.pytorch import banded_resident_partials, resident_bounds
    from infinikv.core.partial import merge_partials
    from infinikv.core.self_extend import resident_partials

    k_pos = torch.cat([torch.arange(0, 8), torch.arange(24, 70)]) if evicted else torch.arange(0, 70)
    T = k_pos.shape[0]
    q_pos = k_pos[T - n :]
    q, k, v = rand(n, 6, D_HEAD, seed=20), rand(T, 2, D_HEAD, seed=21), rand(T, 2, D_HEAD, seed=22)
    k_rope = rotate(k, rope.at(k_pos))
    se = SelfExtend(W, G)
    far_end, near_start = resident_bounds(q_pos, k_pos, se)
    k_group = rotate(k[:near_start], rope.at(se.grouped_key_positions(k_pos[:near_start])))
    got = merge_partials(banded_resident_partials(q, q_pos, k_group, k_rope[far_end:], v, k_pos, rope, se))
    want = merge_partials(resident_partials(q, q_pos, k, k_rope, v, k_pos, rope, se))
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5], ids=["decode", "chunk"])
def test_moved_sinks_are_attended_at_their_new_positions(rope, n) -> None:
    """Through a block table whose sinks moved (PageList.of's sink_gap; the table rotates
    their k_group rows again, PagePool.regroup), the paged path == the reference at the
    table's positions."""
    from infinikv.attention.memory_reads import LongContextState
    from infinikv.attention.pytorch import paged_long_context_attention
    from infinikv.cache.pages import BlockTable, PagePool

    B, W, G = 4, 8, 3
    pool = PagePool(1, 16, B, num_kv_heads=2, head_dim=D_HEAD, fill_value=float("nan"), group=G, rope=rope)
    table = BlockTable(pool, sink_gap=W)
    written = 15 * B
    k_all, v_all = rand(written, 2, D_HEAD, seed=30), rand(written, 2, D_HEAD, seed=31)
    pool.write_keys(0, table.reserve(written), k_all, v_all, pool.key_phases(torch.arange(written)))
    table.page_list()  # read before the move, as a forward would
    pool.free([page for _, page in table.evict_oldest(4, protected=2)])  # blocks 2-5
    pages = table.page_list()
    assert pages.sinks == 2 * B and pages.first is None  # moved; the pages are gathered
    own = torch.tensor([b * B + t for b in table.blocks for t in range(B)])
    k, v, T = k_all[own], v_all[own], own.shape[0]
    q, q_pos = rand(n, 6, D_HEAD, seed=32), own[T - n :]
    se = SelfExtend(W, G)
    state = LongContextState(se, top_k=1, distance=0, memory=None)
    got = paged_long_context_attention(q, q_pos, pool.layer(0), pages, T, 0, rope, state)
    want = long_context_attention(q, q_pos, k, v, pages.positions[:T], rope, se)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    unmoved = long_context_attention(q, q_pos, k, v, own, rope, se)[0]
    assert not torch.allclose(got, unmoved, atol=1e-3)  # the move changes what is read


@pytest.mark.parametrize("granularity", ["block", "token"])
@pytest.mark.parametrize("n", [1, 5], ids=["decode", "chunk"])
def test_paged_memory_covering_everything_equals_one_softmax(rope, n, granularity) -> None:
    """Through a block table (sinks moved) and an evicted memory that every query recalls
    whole, the paged path (a decode step: one softmax over its far, near and recalled keys;
    a chunk: parts merged by log-sum-exp) == the reference at the table's positions."""
    from infinikv.attention.memory_reads import LongContextState
    from infinikv.attention.pytorch import paged_long_context_attention
    from infinikv.cache.pages import BlockTable, PagePool
    from infinikv.memory.evicted import EvictedMemory, MemorySpec

    B, W, G, D, Hkv = 4, 8, 3, 20, 2
    pool = PagePool(1, 16, B, num_kv_heads=Hkv, head_dim=D_HEAD, fill_value=float("nan"), group=G, rope=rope)
    table = BlockTable(pool, sink_gap=W)
    written = 15 * B
    k_all, v_all = rand(written, Hkv, D_HEAD, seed=40), rand(written, Hkv, D_HEAD, seed=41)
    pool.write_keys(0, table.reserve(written), k_all, v_all, pool.key_phases(torch.arange(written)))
    evicted = table.evict_oldest(5, protected=2)  # blocks 2-6
    pool.free([page for _, page in evicted])
    blocks = [b for b, _ in evicted]
    memory = EvictedMemory(MemorySpec(1, Hkv, D_HEAD, B, granularity=granularity))
    gone = torch.arange(blocks[0] * B, (blocks[-1] + 1) * B)
    memory.add_blocks(
        blocks, k_all[gone].view(1, -1, B, Hkv, D_HEAD), v_all[gone].view(1, -1, B, Hkv, D_HEAD)
    )
    pages = table.page_list()
    own = torch.tensor([b * B + t for b in table.blocks for t in range(B)])
    T = own.shape[0]
    q, q_pos = rand(n, 6, D_HEAD, seed=42), own[T - n :]
    se = SelfExtend(W, G)
    state = LongContextState(se, top_k=10_000, distance=D, memory=memory, max_blocks=10_000)
    got = paged_long_context_attention(q, q_pos, pool.layer(0), pages, T, 0, rope, state)
    g = 6 // Hkv  # every query head recalls every evicted entry of its kv-head
    mem_k, mem_v = (
        x[gone].repeat_interleave(g, 1).transpose(0, 1).expand(n, -1, -1, -1) for x in (k_all, v_all)
    )
    want, _ = long_context_attention(
        q, q_pos, k_all[own], v_all[own], pages.positions[:T], rope, se, memory=(mem_k, mem_v), distance=D
    )
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_decode_attention_skips_empty_memory_slots() -> None:
    """Token granularity: each query head its own entries, some slots empty (an approximate
    index found fewer): those are left out of the one softmax (oracle: a loop per head)."""
    from infinikv.attention.memory_reads import Recalled
    from infinikv.attention.pytorch import decode_attention

    Hq, Hkv, K = 6, 2, 5
    g = Hq // Hkv
    qa, qb = rand(1, Hq, D_HEAD, seed=50), rand(1, Hq, D_HEAD, seed=51)
    ka, kb, v = rand(4, Hkv, D_HEAD, seed=52), rand(7, Hkv, D_HEAD, seed=53), rand(11, Hkv, D_HEAD, seed=54)
    queries = rand(Hkv, g, 1, D_HEAD, seed=55)
    keys, values = 3 * rand(Hkv, g, K, D_HEAD, seed=56), 3 * rand(Hkv, g, K, D_HEAD, seed=57)
    valid = rand(Hkv, g, K, seed=58) > 0
    valid[0, 0] = False  # a head that found nothing attends to its resident keys only
    got = decode_attention(qa, ka, qb, kb, v, Recalled(queries, keys, values, valid))
    want = torch.empty(1, Hq, D_HEAD)
    for h in range(Hkv):
        for j in range(g):
            head = h * g + j
            kept = valid[h, j]
            scores = torch.cat(
                [ka[:, h] @ qa[0, head], kb[:, h] @ qb[0, head], keys[h, j, kept] @ queries[h, j, 0]]
            )
            weights = (scores / D_HEAD**0.5).softmax(0)
            want[0, head] = weights @ torch.cat([v[:, h], values[h, j, kept]])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_sinks_k_group_rows_follow_every_move(rope) -> None:
    """The pool's k_group holds every resident key at the grouped place of its table
    position: after the sinks move, move further, and move back when a truncation leaves
    the sinks alone."""
    from infinikv.cache.pages import BlockTable, PagePool

    B, W, G = 4, 6, 2
    pool = PagePool(2, 20, B, num_kv_heads=2, head_dim=D_HEAD, fill_value=float("nan"), group=G, rope=rope)
    table = BlockTable(pool, sink_gap=W)

    def write(n: int, seed: int) -> None:
        start = table.length
        slots = table.reserve(n)
        phases = pool.key_phases(torch.arange(start, start + n))
        for layer in range(2):
            pool.write_keys(layer, slots, rand(n, 2, D_HEAD, seed=seed + layer), rand(n, 2, D_HEAD), phases)

    def assert_k_group_matches_the_table() -> None:
        pages = table.page_list()
        ids = torch.tensor(table.pages)
        want = rotate(pool.k[:, ids].flatten(1, 2), rope.at(pages.positions // G))
        torch.testing.assert_close(pool.k_group[:, ids].flatten(1, 2), want)

    write(10 * B, seed=40)  # blocks 0-9
    assert_k_group_matches_the_table()
    shifts = []
    for evict, seed in [(3, 50), (2, 60)]:  # sinks: blocks 0 and 1
        pool.free([page for _, page in table.evict_oldest(evict, protected=2)])
        write(B, seed)
        assert_k_group_matches_the_table()
        shifts.append(table.page_list().shift)
    assert 0 < shifts[0] < shifts[1]
    table.truncate(table.evicted_until)  # only the sinks stay: back at their own positions
    assert table.page_list().sinks == 0
    assert_k_group_matches_the_table()
