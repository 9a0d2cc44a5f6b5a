"""Paged KV cache invariants on random tiny models (NaN-filled fresh pages)."""

from __future__ import annotations

import logging

import pytest
import torch

from infinikv.cache.pages import NULL_PAGE, BlockTable, PagePool
from infinikv.engine.sequence import Sequence, feed
from infinikv.errors import CacheFullError
from infinikv.model.llama import ForwardBatch, SequenceSlice
from infinikv.service.runtime import warn_if_pool_exceeds

from .conftest import nan_pool, ours_from_hf, tiny_hf_model


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama", seed=3))


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    pool = nan_pool(model, page_size=8)
    return feed(model, pool, Sequence(pool), ids, 512, logits="all")


def small_pool(num_pages: int = 6, page_size: int = 4) -> PagePool:
    return PagePool(1, num_pages, page_size, num_kv_heads=1, head_dim=2)


def test_null_page_never_allocated_and_pool_exhaustion() -> None:
    pool = small_pool()
    pages = pool.allocate(5)
    assert NULL_PAGE not in pages and sorted(pages) == [1, 2, 3, 4, 5]
    with pytest.raises(CacheFullError, match="KV cache full"):
        pool.allocate(1)


def test_a_pool_larger_than_the_ram_is_reported_naming_the_setting(caplog) -> None:
    pool = PagePool(2, 6, 4, num_kv_heads=1, head_dim=2, group=2)  # k, k_rope, v, k_group
    assert pool.nbytes == 4 * 2 * 6 * 4 * 2 * 4
    with caplog.at_level(logging.WARNING, logger="infinikv.service.runtime"):
        warn_if_pool_exceeds(pool, pool.nbytes)
        assert not caplog.records
        warn_if_pool_exceeds(pool, pool.nbytes - 1)
    assert "--slots" in caplog.text and "--kv-dtype" in caplog.text
    narrow = PagePool(2, 6, 4, num_kv_heads=1, head_dim=2, group=2, dtype=torch.bfloat16)
    assert narrow.nbytes == pool.nbytes // 2


def test_a_bfloat16_pool_keeps_its_writes_rounded_as_torch_rounds() -> None:
    pool = PagePool(2, 4, 4, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
    slots = BlockTable(pool).reserve(3)
    k, v = torch.randn(3, 2, 4) * 1e3, torch.randn(3, 2, 4)
    pool.write(1, slots, k, k + 1, v, k + 1)
    for cache, want in ((pool.k, k), (pool.k_rope, k + 1), (pool.v, v)):
        assert torch.equal(cache[1].view(-1, 2, 4)[slots], want.to(torch.bfloat16))


def test_block_table_slots_and_truncate_frees_pages() -> None:
    pool = small_pool()
    table = BlockTable(pool)
    slots = table.reserve(6)  # pages 1, 2
    assert slots.tolist() == [4, 5, 6, 7, 8, 9]
    assert table.reserve(3).tolist() == [10, 11, 12]  # 9 tokens -> page 3 taken
    assert table.pages == [1, 2, 3] and pool.num_free == 2
    table.truncate(5)
    assert table.pages == [1, 2] and table.length == 5 and pool.num_free == 3
    assert table.reserve(1).tolist() == [9]  # continues inside page 2
    with pytest.raises(ValueError):
        table.truncate(7)
    table.release()
    assert pool.num_free == 5 and table.pages == []


@pytest.mark.parametrize("pages", [[2, 3, 4], [4, 1, 3]], ids=["one run (a view)", "gathered"])
def test_page_list_gathers_any_range_of_resident_tokens(pages) -> None:
    from infinikv.cache.pages import PageList

    cache = torch.arange(6 * 4 * 2.0).view(6, 4, 1, 2)  # (P, B, H, d): page p's token t at 8p + 2t
    page_list = PageList.of(pages, [0, 1, 2], 4, torch.device("cpu"))
    every = cache[pages].flatten(0, 1)  # (12, 1, 2)
    for start, stop in [(0, 12), (0, 10), (3, 9), (4, 8), (5, 5), (11, 12)]:
        assert torch.equal(page_list.gather(cache, stop, start), every[start:stop]), (start, stop)


def test_a_grouped_pool_keeps_keys_at_their_grouped_positions(model) -> None:
    from infinikv.core.rope import rotate

    pool = model.new_page_pool(64, 4, fill_value=float("nan"), group=3)
    plain = model.new_page_pool(64, 4)
    assert pool.k_group is not pool.k_rope and plain.k_group is plain.k_rope  # G = 1: one tensor
    seq = Sequence(pool)
    feed(model, pool, seq, tokens(21, seed=4), 8)
    pages = seq.table.page_list()
    for layer in range(model.cfg.num_layers):
        k = pages.gather(pool.k[layer], 21)
        want = rotate(k, model.rope.at(torch.arange(21) // 3))
        torch.testing.assert_close(pages.gather(pool.k_group[layer], 21), want)


def test_freed_pages_are_reused_without_stale_reads(model) -> None:
    pool = nan_pool(model, max_tokens=60, page_size=5)
    first = Sequence(pool)
    feed(model, pool, first, tokens(37, 1), 16)
    used = set(first.table.pages)
    first.release()
    second = Sequence(pool)
    ids = tokens(29, 2)
    got = feed(model, pool, second, ids, 16, logits="all")
    assert used & set(second.table.pages), "freed pages were not reused"
    torch.testing.assert_close(got, reference_logits(model, ids))


def test_truncate_then_continue_equals_fresh_sequence(model) -> None:
    # Draft tokens that get rejected are rolled back with truncate.
    pool = nan_pool(model, page_size=5)
    seq = Sequence(pool)
    prefix, rejected, accepted = tokens(23, 3), tokens(9, 4), tokens(6, 5)
    feed(model, pool, seq, prefix + rejected, 8)
    free_before = pool.num_free
    seq.truncate(len(prefix))
    assert pool.num_free > free_before and len(seq) == len(prefix)
    got = feed(model, pool, seq, accepted, 8, logits="all")
    want = reference_logits(model, prefix + accepted)[len(prefix) :]
    torch.testing.assert_close(got, want)


def test_two_sequences_in_one_batch_equal_separate_runs(model) -> None:
    pool = nan_pool(model, page_size=4)
    a, b = Sequence(pool), Sequence(pool)
    ids_a, ids_b = tokens(13, 6), tokens(6, 7)
    feed(model, pool, a, ids_a[:-1], 5)
    feed(model, pool, b, ids_b[:-2], 5)
    # One forward: the last token of a (decode) and the last two of b (a small chunk).
    slots = torch.cat([a.table.reserve(1), b.table.reserve(2)])
    batch = ForwardBatch(
        tokens=torch.tensor([ids_a[-1], *ids_b[-2:]]),
        positions=torch.tensor([12, 4, 5]),
        slots=slots,
        seqs=(
            SequenceSlice(0, 1, a.table.page_list(), a.table.length),
            SequenceSlice(1, 2, b.table.page_list(), b.table.length),
        ),
    )
    got = model(batch, pool)  # (3, V)
    torch.testing.assert_close(got[0], reference_logits(model, ids_a)[-1])
    torch.testing.assert_close(got[1:], reference_logits(model, ids_b)[-2:])


def test_sinks_move_beside_the_rest_once_blocks_between_are_evicted() -> None:
    from infinikv.cache.pages import PageList

    cpu = torch.device("cpu")
    # Sinks: blocks 0 and 1 (B = 4); blocks 2-4 evicted; the next resident token is at 20.
    moved = PageList.of([1, 2, 3, 4], [0, 1, 5, 6], 4, cpu, sink_gap=3)
    assert moved.sinks == 8 and moved.end == 28
    assert moved.positions.tolist() == list(range(10, 18)) + list(range(20, 28))  # last sink at 20 - 3
    # Too few evicted for the gap, nothing evicted, or no gap asked for: the sinks stay.
    for blocks, gap in [([0, 1, 3, 4], 5), ([0, 1, 2, 3], 3), ([0, 1, 5, 6], 0)]:
        kept = PageList.of([1, 2, 3, 4], blocks, 4, cpu, sink_gap=gap)
        assert kept.sinks == 0 and kept.positions.tolist() == [b * 4 + t for b in blocks for t in range(4)]
