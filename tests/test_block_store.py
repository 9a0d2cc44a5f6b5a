"""Block stores (in-process and a real redis-server) and memory snapshots through them."""

from __future__ import annotations

import pytest
import torch

from infinikv.memory.evicted import EvictedMemory
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import InProcessBlockStore, RedisBlockStore, StoreUnavailableError, open_store

from .conftest import retrieve, retrieve_blocks
from .redis_server import free_port, redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(params=["inprocess", "redis"])
def store(request):
    if request.param == "inprocess":
        yield InProcessBlockStore()
        return
    made = RedisBlockStore(request.getfixturevalue("redis_url"))
    made.delete_prefix("")
    yield made
    made.close()


def test_batched_put_get_and_prefix_delete(store) -> None:
    items = {f"s1:block:{i}": bytes([i % 256]) * (i + 1) for i in range(600)}  # > one pipeline
    items["s2:block:0"] = b"\x00\xff binary \x00"
    store.put_many(items)
    assert store.get_many(["s1:block:599", "s2:block:0", "missing"]) == [
        items["s1:block:599"],
        items["s2:block:0"],
        None,
    ]
    assert store.delete_prefix("s1:") == 600
    assert store.keys("s1:") == [] and store.keys("s2:") == ["s2:block:0"]


def memory_with_blocks(store, prefix: str, nblocks: int = 5, granularity: str = "token") -> EvictedMemory:
    mem = EvictedMemory(2, 3, 16, 4, store=store, prefix=prefix, granularity=granularity)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, nblocks, 4, 3, 16, generator=g)
    v = torch.randn(2, nblocks, 4, 3, 16, generator=g)
    mem.add_blocks(list(range(2, 2 + nblocks)), k, v)
    return mem


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_snapshot_round_trip_gives_identical_retrieval(store, granularity) -> None:
    mem = memory_with_blocks(store, "sess:a:", granularity=granularity)
    mem.save()
    back = EvictedMemory.load(store, "sess:a:")
    assert back.granularity == granularity
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))
    for layer in range(2):
        if granularity == "token":
            pairs = [(retrieve(back, layer, q, 6), retrieve(mem, layer, q, 6))]
        else:  # the sketch is rebuilt from the stored blocks
            pairs = [
                tuple(retrieve_blocks(m, layer, q[:, None], 2, r) for m in (back, mem))
                for r in ("bound", "sketch")
            ]
        for got, want in pairs:
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)
    assert back.tokens == mem.tokens == 20


def test_blocks_evicted_after_the_last_snapshot_are_indexed_again_on_load(store) -> None:
    """A crash between snapshots loses nothing: the blocks are the truth, the snapshot a cache."""
    mem = memory_with_blocks(store, "sess:t:", nblocks=3)
    mem.save()
    g = torch.Generator().manual_seed(2)
    mem.add_blocks([5, 6], torch.randn(2, 2, 4, 3, 16, generator=g), torch.randn(2, 2, 4, 3, 16, generator=g))
    mem.save(index=False)
    back = EvictedMemory.load(store, "sess:t:")
    assert back.tokens == mem.tokens == 20 and back.index.ntotal == 20 and back.snapshot_blocks == 3
    q = torch.randn(3, 4, 16, generator=g)
    for got, want in zip(retrieve(back, 1, q, 20), retrieve(mem, 1, q, 20), strict=True):
        assert torch.equal(got, want)


def test_delete_really_deletes_and_leaves_other_sessions(store) -> None:
    a, b = memory_with_blocks(store, "sess:a:"), memory_with_blocks(store, "sess:b:")
    a.save()
    b.save()
    assert a.delete() == 5 + 2  # blocks, meta, index
    assert store.keys("sess:a:") == []
    with pytest.raises(CorruptSnapshotError, match="no memory snapshot"):
        EvictedMemory.load(store, "sess:a:")
    assert EvictedMemory.load(store, "sess:b:").tokens == 20


@pytest.mark.parametrize("damage", ["index", "meta", "block:3"])
def test_corrupt_snapshot_is_reported_and_other_sessions_survive(store, damage) -> None:
    memory_with_blocks(store, "sess:bad:").save()
    memory_with_blocks(store, "sess:good:").save()
    store.put_many({f"sess:bad:{damage}": b"\x00garbage"})
    with pytest.raises(CorruptSnapshotError, match="sess:bad:"):
        EvictedMemory.load(store, "sess:bad:")
    assert EvictedMemory.load(store, "sess:good:").tokens == 20


def test_unreachable_redis_names_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreUnavailableError, match=f"cannot reach Redis at {url}"):
        open_store(url)


def test_redis_cluster_three_nodes(tmp_path) -> None:
    from .redis_server import redis_cluster

    with redis_cluster(tmp_path) as ports:
        store = RedisBlockStore(f"redis://127.0.0.1:{ports[0]}", cluster=True)
        mem = memory_with_blocks(store, "sess:c:", nblocks=40)  # keys spread over all nodes' slots
        mem.save()
        back = EvictedMemory.load(store, "sess:c:")
        q = torch.randn(3, 2, 16)
        assert torch.equal(retrieve(back, 1, q, 5)[0], retrieve(mem, 1, q, 5)[0])
        assert sorted(store.keys("sess:c:")) == sorted(
            [f"sess:c:block:{b}" for b in range(2, 42)] + ["sess:c:meta", "sess:c:index"]
        )
        assert mem.delete() == 42 and store.keys("sess:c:") == []
        store.close()


def test_a_redis_that_goes_away_is_a_clear_store_error(tmp_path) -> None:
    with redis_server(tmp_path) as port:
        store = RedisBlockStore(f"redis://127.0.0.1:{port}/0")
        store.put_many({"k": b"v"})
    with pytest.raises(StoreUnavailableError, match=f"Redis at redis://127.0.0.1:{port}/0 failed"):
        store.get_many(["k"])


def test_block_cache_keeps_the_most_recently_used_within_its_capacity() -> None:
    from infinikv.memory.cache import BlockCache

    payload = {b: torch.full((2, 1, 1, 2, 1, 1), float(b)) for b in range(10)}  # (2, L, n, B, H, d)
    calls: list[list[int]] = []

    def fetch(blocks: list[int]) -> torch.Tensor:
        calls.append(blocks)
        return torch.cat([payload[b] for b in blocks], 2)

    cache = BlockCache((1, 2, 1, 1), torch.float32, fetch, capacity=3)
    slab = cache.slab.data_ptr()  # allocated once, at its capacity: never copied
    assert cache.nbytes == 0
    cache.put(list(range(5)), torch.cat([payload[b] for b in range(5)], 2))
    assert len(cache) == 3 and calls == []  # blocks 2, 3, 4 stay
    assert cache.nbytes == 3 * 2 * 2 * 4
    slots = cache.slots([2, 0, 4])  # 0 is fetched; 3, the least recently used, leaves
    assert calls == [[0]] and len(cache) == 3
    k, _ = cache.layer(0)
    assert k.view(-1, 2)[slots, 0].tolist() == [2.0, 0.0, 4.0]
    cache.slots([3])
    assert calls == [[0], [3]]  # 3 was gone; 2 (least recent) leaves for it
    with pytest.raises(ValueError, match="4 blocks needed at once, the cache holds 3"):
        cache.slots([0, 1, 3, 4])
    assert cache.slab.data_ptr() == slab


def test_an_unbounded_block_cache_grows_and_keeps_every_block() -> None:
    from infinikv.memory.cache import BlockCache

    cache = BlockCache((1, 2, 1, 1), torch.float32, None, capacity=None)
    assert cache.nbytes == 0  # an empty slab has no slot to measure
    for b in range(7):  # one block at a time: the slab doubles, copying what it holds
        cache.put([b], torch.full((2, 1, 1, 2, 1, 1), float(b)))
    k, v = cache.layer(0)
    slots = cache.slots(list(range(7)))
    every = [float(b) for b in range(7)]
    assert k.view(-1, 2)[slots, 1].tolist() == v.view(-1, 2)[slots, 0].tolist() == every
    assert cache.nbytes == 7 * 2 * 2 * 4 and cache.slab.shape[2] == 8
    with pytest.raises(KeyError, match="not in memory"):
        cache.slots([7])


def test_a_memory_bounded_in_ram_retrieves_what_an_unbounded_one_does(store) -> None:
    """Block granularity: at most 3 of 8 blocks in RAM, the rest read back from the store."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 8, 4, 3, 16, generator=g), torch.randn(2, 8, 4, 3, 16, generator=g)
    bounded = EvictedMemory(2, 3, 16, 4, store=store, prefix="sess:ram:", granularity="block", ram_blocks=3)
    everything = EvictedMemory(2, 3, 16, 4, granularity="block")
    for mem in (bounded, everything):
        mem.add_blocks(list(range(8)), k, v)
    for step in range(8):
        q = torch.randn(3, 1, 2, 16, generator=g)
        layer, ranking = step % 2, ("bound", "sketch")[step // 2 % 2]
        for got, want in zip(
            retrieve_blocks(bounded, layer, q, 1, ranking),
            retrieve_blocks(everything, layer, q, 1, ranking),
            strict=True,
        ):
            assert torch.equal(got, want)
    assert len(bounded.cache) <= 3 and bounded.cache.fetched > 0
    bounded.save()
    back = EvictedMemory.load(store, "sess:ram:", ram_blocks=3)
    assert len(back.cache) == 3 and back.tokens == 32
    q = torch.randn(3, 1, 2, 16, generator=g)  # at most 3 blocks at once
    for ranking in ("bound", "sketch"):
        got_want = (retrieve_blocks(m, 0, q, 1, ranking) for m in (back, everything))
        for got, want in zip(*got_want, strict=True):
            assert torch.equal(got, want)
