"""The prefix cache (cache/prefix.py): a prompt that starts with tokens seen before attaches
their full KV pages instead of computing them, and its output is the same, bit for bit, as
without the cache (plain and long-context, alone and in the engine's batches); a shared page
is copied before a sequence would change it; the pool takes cached pages back when it needs
them."""

from __future__ import annotations

import pytest
import torch

from infinikv.cache.pages import BlockTable, PagePool
from infinikv.cache.prefix import PrefixCache
from infinikv.engine.generator import Generator
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.sequence import Sequence, feed
from infinikv.engine.tasks import TaskHandle
from infinikv.errors import CacheFullError
from infinikv.memory.store import InProcessBlockStore

from .conftest import (
    TINY_PAGE,
    generation_task,
    ours_from_hf,
    random_ids,
    task_result,
    tiny_generator,
    tiny_hf_model,
)


def snapshot(pool: PagePool, pages: list[int]) -> list[torch.Tensor]:
    """What `pages` hold in every layer and cache."""
    return [c[:, pages].clone() for c in (pool.k, pool.k_rope, pool.v, pool.k_group)]


def unchanged(pool: PagePool, pages: list[int], kept: list[torch.Tensor]) -> bool:
    return all(map(torch.equal, snapshot(pool, pages), kept))


def test_a_shared_page_is_free_only_once_its_last_holder_lets_go() -> None:
    pool = PagePool(1, 4, 2, num_kv_heads=1, head_dim=2)
    (page,) = pool.allocate(1)
    pool.share([page])
    pool.free([page])
    assert pool.holders(page) == 1 and pool.num_free == 2
    pool.free([page])
    assert pool.holders(page) == 0 and pool.num_free == 3
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([page])
    with pytest.raises(ValueError, match="is free"):
        pool.share([page])


def test_the_cache_finds_whole_token_chains_of_one_kind_only() -> None:
    pool = PagePool(1, 8, 2, num_kv_heads=1, head_dim=2)
    cache = PrefixCache(pool)
    table = BlockTable(pool)
    table.reserve(7)  # pages for tokens 0-1, 2-3, 4-5 and the partial 6
    cache.insert([1, 2, 3, 4, 5, 6, 7], table.pages, "k")
    full = table.pages[:3]
    assert len(cache) == 3 and all(pool.holders(p) == 2 for p in full)
    assert cache.match([1, 2, 3, 4, 5, 6, 9], "k", most=9) == full
    assert cache.match([1, 2, 3, 9, 5, 6], "k", most=9) == full[:1]  # the chain breaks at a change
    assert cache.match([9, 2, 3, 4], "k", most=9) == []  # the same page tokens after another prefix
    assert cache.match([1, 2, 3, 4], "other", most=9) == []
    assert cache.match([1, 2, 3, 4, 5, 6], "k", most=2) == full[:2]
    assert cache.match([1, 2, 3, 4, 5, 6], "k", most=9, unit=2) == full[:2]
    assert cache.hit_tokens == 2 * (3 + 1 + 2 + 2)


def test_the_pool_takes_back_the_least_recently_used_pages_no_sequence_holds() -> None:
    pool = PagePool(1, 7, 2, num_kv_heads=1, head_dim=2)  # 6 pages of 2 tokens
    cache = PrefixCache(pool)
    a, b = BlockTable(pool), BlockTable(pool)
    a.reserve(4)
    cache.insert([1, 2, 3, 4], a.pages, "k")
    b.reserve(2)
    cache.insert([5, 6], b.pages, "k")
    a_pages, b_pages = list(a.pages), list(b.pages)
    a.release()
    b.release()
    assert cache.match([1, 2, 3, 4, 0], "k", most=9) == a_pages  # [1, 2, 3, 4] used last
    holder = BlockTable(pool)
    holder.attach(a_pages[:1])  # a sequence holds the first page
    assert pool.num_free == 3
    fresh = BlockTable(pool)
    fresh.reserve(10)  # 5 pages: [5, 6]'s goes first, then the unheld second page of [1, 2, 3, 4]
    assert cache.match([5, 6, 0], "k", most=9) == []
    assert cache.match([1, 2, 3, 4, 0], "k", most=9) == a_pages[:1]
    assert b_pages[0] in fresh.pages and a_pages[1] in fresh.pages
    with pytest.raises(CacheFullError):
        BlockTable(pool).reserve(2)  # the held page cannot be taken


def test_a_table_copies_a_shared_page_before_writing_into_it() -> None:
    pool = PagePool(1, 8, 4, num_kv_heads=1, head_dim=2)
    cache = PrefixCache(pool)
    first = BlockTable(pool)
    slots = first.reserve(8)
    values = torch.arange(8 * 2.0).view(8, 1, 2)
    pool.write(0, slots, values, values, values, values)
    cache.insert(list(range(8)), first.pages, "k")
    kept = snapshot(pool, first.pages)
    second = BlockTable(pool)
    second.attach(cache.match(list(range(9)), "k", most=2))
    second.truncate(6)  # into the second shared page
    pool.write(0, second.reserve(2), -values[:2], -values[:2], -values[:2], -values[:2])
    assert second.pages[0] == first.pages[0] and second.pages[1] != first.pages[1]
    assert unchanged(pool, first.pages, kept)
    assert torch.equal(pool.k[0, second.pages[1], :2], kept[0][0, 1, :2])  # the copy kept tokens 4, 5
    assert torch.equal(pool.k[0, second.pages[1], 2:], -values[:2])


def test_sinks_that_move_are_rotated_again_in_copies_of_shared_pages() -> None:
    model = ours_from_hf(tiny_hf_model("llama", seed=3))
    pool = model.new_page_pool(64, TINY_PAGE, group=2)
    cache = PrefixCache(pool)
    seq = Sequence(pool)
    feed(model, pool, seq, random_ids(24, 8), 8)
    cache.insert(seq.tokens, seq.table.pages, "k")
    cached = list(seq.table.pages)
    kept = snapshot(pool, cached)
    seq.release()
    table = BlockTable(pool, sink_gap=2)
    table.attach(cached)
    table.reserve(1)
    victims = table.evict_oldest(3, protected=1)  # blocks 0, 4, 5, 6: the sink moves
    pool.free([page for _, page in victims])
    moved = table.page_list()
    assert moved.sinks == TINY_PAGE and table.pages[0] != cached[0]
    assert unchanged(pool, cached, kept)
    assert torch.equal(pool.k[:, table.pages[0]], kept[0][:, 0])
    assert not torch.equal(pool.k_group[:, table.pages[0]], kept[3][:, 0])


def logprobs(gen: Generator, prompt: list[int]) -> list[tuple[int, float]]:
    """Each generated token and its log-probability (any change in a key changes them)."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=0)
    return [(e.token_id, e.logprob.logprob) for e in gen.stream(prompt, params) if e.logprob is not None]


@pytest.mark.parametrize("long", [False, True], ids=["plain", "long-context"])
def test_prompts_that_share_a_prefix_give_their_tokens_without_the_cache(kernel_tiny, long) -> None:
    """Short prompts (in pieces) and long ones (in chunks; long-context ones past the
    32-token resident window, evicting into memory after the attached pages)."""
    base = random_ids(120, 1)
    prompts = [base[:20], base[:23], base[:20] + random_ids(9, 2), base, base[:90] + random_ids(30, 3)]
    prompts.append(random_ids(7, 4) + base)  # the same tokens after another start: no hit
    want = [logprobs(tiny_generator(kernel_tiny, long, prefix_cache=False), p) for p in prompts]
    gen = tiny_generator(kernel_tiny, long, prefix_cache=True)
    assert gen.prefix_cache is not None
    assert [logprobs(gen, p) for p in prompts] == want
    assert gen.prefix_cache.hit_tokens > 0
    hits = gen.prefix_cache.hit_tokens
    assert [logprobs(gen, p) for p in prompts] == want  # again, every prompt cached
    assert gen.prefix_cache.hit_tokens > hits


@pytest.mark.parametrize("long", [False, True], ids=["plain", "long-context"])
def test_requests_of_one_prompt_share_its_pages_in_the_engine_batches(kernel_tiny, long) -> None:
    """Each gives its tokens alone while they decode side by side (long-context ones past
    their resident window: evicting, their sinks moving in copies of the shared pages)."""
    gen = tiny_generator(kernel_tiny, long, prefix_cache=True)
    assert gen.prefix_cache is not None
    prompt = random_ids(60, 5)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = tiny_generator(kernel_tiny, long, prefix_cache=False).generate(prompt, params).token_ids
    assert gen.generate(prompt, params).token_ids == want
    hits = gen.prefix_cache.hit_tokens
    engine = Engine(gen, InProcessBlockStore())
    engine.start()
    try:
        handles = [
            engine.submit(generation_task(prompt, params), TaskHandle(), needs_sequence=True)
            for _ in range(3)
        ]
        got = [task_result(h) for h in handles]
    finally:
        engine.stop()
    assert got == [want] * 3
    assert gen.prefix_cache.hit_tokens >= hits + 3 * TINY_PAGE
