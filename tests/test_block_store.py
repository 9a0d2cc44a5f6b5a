"""Block stores (in-process and a real redis-server) and memory snapshots through them."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from infinikv.memory import snapshot
from infinikv.memory.evicted import EvictedMemory, MemorySpec
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import InProcessBlockStore, RedisBlockStore, StoreUnavailableError, open_store

from .conftest import retrieve, retrieve_blocks
from .redis_server import free_port, redis_server


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


def test_slices_read_part_of_each_value(store) -> None:
    store.put_many({"s:block:0": b"0123456789", "s:block:1": b"abcdefghij", "s:short": b"abc"})
    assert store.get_slices(["s:block:1", "s:block:0", "s:short", "s:missing"], 2, 4) == [
        b"cdef",
        b"2345",
        None,  # too short for the slice
        None,
    ]
    assert store.get_slices(["s:block:0"], 6, 4) == [b"6789"]


def memory_with_blocks(store, prefix: str, nblocks: int = 5, granularity: str = "token") -> EvictedMemory:
    mem = EvictedMemory(MemorySpec(2, 3, 16, 4, granularity=granularity), store=store, prefix=prefix)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, nblocks, 4, 3, 16, generator=g)
    v = torch.randn(2, nblocks, 4, 3, 16, generator=g)
    mem.add_blocks(list(range(2, 2 + nblocks)), k, v)
    return mem


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_snapshot_round_trip_gives_identical_retrieval(store, granularity) -> None:
    mem = memory_with_blocks(store, "sess:a:", granularity=granularity)
    store.put_many(snapshot.records(mem))
    back = snapshot.load(store, "sess:a:")
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
    store.put_many(snapshot.records(mem))
    g = torch.Generator().manual_seed(2)
    mem.add_blocks([5, 6], torch.randn(2, 2, 4, 3, 16, generator=g), torch.randn(2, 2, 4, 3, 16, generator=g))
    store.put_many(snapshot.records(mem, index=False))
    back = snapshot.load(store, "sess:t:")
    assert back.tokens == mem.tokens == 20 and back.index.ntotal == 20 and back.snapshot_blocks == 3
    q = torch.randn(3, 4, 16, generator=g)
    for got, want in zip(retrieve(back, 1, q, 20), retrieve(mem, 1, q, 20), strict=True):
        assert torch.equal(got, want)


def test_favourites_survive_a_snapshot_and_damaged_ones_are_refused(store) -> None:
    """A reloaded block memory picks what the saved one picks from its favourites on; a
    damaged favourites record is a CorruptSnapshotError for that memory."""
    g = torch.Generator().manual_seed(5)
    mem = EvictedMemory(
        MemorySpec(2, 3, 16, 4, granularity="block", sketch_every=4), store=store, prefix="sess:f:"
    )
    k, v = torch.randn(2, 40, 4, 3, 16, generator=g), torch.randn(2, 40, 4, 3, 16, generator=g)
    mem.add_blocks(list(range(40)), k, v)
    for position in range(3):  # the full ranking at 0 chose favourites; 1 and 2 used them
        retrieve_blocks(mem, 0, torch.randn(3, 1, 2, 16, generator=g), 2, "sketch", position)
    store.put_many(snapshot.records(mem))
    back = snapshot.load(store, "sess:f:", sketch_every=4)
    q = torch.randn(3, 1, 2, 16, generator=g)
    for got, want in zip(*(retrieve_blocks(m, 0, q, 2, "sketch", 3) for m in (back, mem)), strict=True):
        assert torch.equal(got, want)
    fresh = EvictedMemory(MemorySpec(2, 3, 16, 4, granularity="block", sketch_every=4))
    fresh.add_blocks(list(range(40)), k, v)
    assert not torch.equal(
        retrieve_blocks(fresh, 0, q, 2, "sketch", 3)[0], retrieve_blocks(mem, 0, q, 2, "sketch", 3)[0]
    )
    bigger = snapshot.load(store, "sess:f:", sketch_every=4)  # used with max_blocks 8
    bigger.add_blocks([40, 41, 42], k[:, :3], v[:, :3])  # more than the saved buffer has room for
    for position in (3, 4):  # 2's favourites were chosen for max_blocks 2: ranked in full again
        keys, _ = retrieve_blocks(bigger, 0, torch.randn(3, 1, 2, 16, generator=g), 8, "sketch", position)
        assert keys.shape == (3, 1, 8 * 4, 16)
    for damaged in (b"not json", b"[[[0, [[99]], 40, 40, 64]], []]"):
        store.put_many({"sess:f:favourites": damaged})
        with pytest.raises(CorruptSnapshotError, match="sess:f:"):
            snapshot.load(store, "sess:f:", sketch_every=4)


def test_delete_really_deletes_and_leaves_other_sessions(store) -> None:
    a, b = memory_with_blocks(store, "sess:a:"), memory_with_blocks(store, "sess:b:")
    store.put_many(snapshot.records(a))
    store.put_many(snapshot.records(b))
    assert a.delete() == 5 + 2  # blocks, meta, index
    assert store.keys("sess:a:") == []
    with pytest.raises(CorruptSnapshotError, match="no memory snapshot"):
        snapshot.load(store, "sess:a:")
    assert snapshot.load(store, "sess:b:").tokens == 20


@pytest.mark.parametrize("damage", ["index@5", "meta", "block:3"])
def test_corrupt_snapshot_is_reported_and_other_sessions_survive(store, damage) -> None:
    bad, good = memory_with_blocks(store, "sess:bad:"), memory_with_blocks(store, "sess:good:")
    store.put_many({**snapshot.records(bad), **snapshot.records(good)})
    store.put_many({f"sess:bad:{damage}": b"\x00garbage"})
    with pytest.raises(CorruptSnapshotError, match="sess:bad:"):
        snapshot.load(store, "sess:bad:")
    assert snapshot.load(store, "sess:good:").tokens == 20


def test_in_process_store_reuses_freed_space_and_shrinks_its_file() -> None:
    """Values live in the store's file: overwriting, deleting and putting again reuses
    the freed space, so a service that evicts and forgets sessions does not grow its file."""
    store = InProcessBlockStore()
    size = lambda: os.fstat(store._file.fileno()).st_size  # noqa: E731
    block = bytes(range(256)) * 64
    store.put_many({f"s{s}:block:{b}": block for s in range(3) for b in range(10)})
    full = size()
    assert full == 30 * len(block)
    store.put_many({"s0:block:3": b"short"})  # overwritten in a hole, the old run freed
    store.delete_prefix("s1:")
    store.put_many({f"s3:block:{b}": block[::-1] for b in range(10)})
    assert size() <= full + len(b"short")
    assert store.get_many(["s0:block:3", "s0:block:4", "s3:block:9", "s1:block:0"]) == [
        b"short",
        block,
        block[::-1],
        None,
    ]
    for prefix in ("s0:", "s2:", "s3:"):
        store.delete_prefix(prefix)
    assert size() == 0 and store.keys("") == []
    store.close()
    with pytest.raises(StoreUnavailableError, match="in-process block store"):
        store.put_many({"s4:block:0": block})


def test_a_full_disk_is_a_store_error_that_keeps_the_old_value(tmp_path) -> None:
    """RLIMIT_FSIZE stands in for a full disk (in a child process: it limits every write)."""
    script = """
import resource, signal
from infinikv.memory.store import InProcessBlockStore, StoreUnavailableError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
store = InProcessBlockStore()
store.put_many({"a": b"x" * 1000})
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    store.put_many({"a": b"y" * 8192})
except StoreUnavailableError as e:
    print("refused:", e)
assert store.get_many(["a"]) == [b"x" * 1000]
store.put_many({"b": b"z" * 100})  # what fits still goes in
assert store.get_many(["b"]) == [b"z" * 100]
print("ok")
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: in-process block store file" in out.stdout and "File too large" in out.stdout
    assert out.stdout.endswith("ok\n")


def test_extents_never_overlap_and_shrink_back_to_nothing() -> None:
    """Random takes and gives against a byte map of what is in use."""
    from infinikv.memory.extents import Extents

    rng = random.Random(0)
    space, used, held = Extents(), bytearray(1 << 16), []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            start, n = held.pop(rng.randrange(len(held)))
            used[start : start + n] = bytes(n)
            space.give(start, n)
        else:
            n = rng.choice([64, 64, 64, 100, 7, 300])
            start = space.take(n)
            assert not any(used[start : start + n]), "handed out bytes still in use"
            used[start : start + n] = b"\x01" * n
            held.append((start, n))
        assert space.end == max((s + n for s, n in held), default=0)
    for start, n in held:
        space.give(start, n)
    assert space.end == 0  # a lost free run would keep the end from shrinking past it


def test_a_snapshot_with_another_payload_layout_is_refused_not_scrambled(store) -> None:
    import json

    old = memory_with_blocks(store, "sess:old:")
    store.put_many(snapshot.records(old))
    (raw,) = store.get_many(["sess:old:meta"])
    meta = json.loads(raw)
    del meta["layout"]  # as an older build wrote it
    store.put_many({"sess:old:meta": json.dumps(meta).encode()})
    with pytest.raises(CorruptSnapshotError, match="laid out .*older build"):
        snapshot.load(store, "sess:old:")


def test_unreachable_redis_names_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreUnavailableError, match=f"cannot reach Redis at {url}"):
        open_store(url)


def test_redis_cluster_three_nodes(tmp_path) -> None:
    from .redis_server import redis_cluster

    with redis_cluster(tmp_path) as ports:
        store = RedisBlockStore(f"redis://127.0.0.1:{ports[0]}", cluster=True)
        mem = memory_with_blocks(store, "sess:c:", nblocks=40)  # keys spread over all nodes' slots
        store.put_many(snapshot.records(mem))
        back = snapshot.load(store, "sess:c:")
        q = torch.randn(3, 2, 16)
        assert torch.equal(retrieve(back, 1, q, 5)[0], retrieve(mem, 1, q, 5)[0])
        assert sorted(store.keys("sess:c:")) == sorted(
            [f"sess:c:block:{b}" for b in range(2, 42)] + ["sess:c:meta", "sess:c:index@40"]
        )
        assert mem.delete() == 42 and store.keys("sess:c:") == []
        store.close()


def test_a_redis_that_goes_away_is_a_clear_store_error(tmp_path) -> None:
    with redis_server(tmp_path) as port:
        store = RedisBlockStore(f"redis://127.0.0.1:{port}/0")
        store.put_many({"k": b"v"})
    with pytest.raises(StoreUnavailableError, match=f"Redis at redis://127.0.0.1:{port}/0 failed"):
        store.get_many(["k"])


def test_block_cache_keeps_each_layers_most_recently_used_within_its_capacity() -> None:
    from infinikv.memory.cache import BlockCache

    # Block b's payload in layer l holds 10 * l + b: (2, L, n, B, H, d) with L = 2.
    payload = {
        b: torch.tensor([float(b), 10.0 + b]).view(1, 2, 1, 1, 1, 1).expand(2, 2, 1, 2, 1, 1)
        for b in range(10)
    }
    calls: list[tuple[int, list[int]]] = []

    def fetch(layer: int, blocks: list[int]) -> torch.Tensor:
        calls.append((layer, blocks))
        return torch.cat([payload[b][:, layer] for b in blocks], 1)

    def values(layer: int, slots: torch.Tensor) -> list[float]:
        k, _ = cache.layer(layer)
        return k.view(-1, 2)[slots, 0].tolist()

    cache = BlockCache((2, 2, 1, 1), torch.float32, fetch, capacity=3)
    slab = cache.slab.data_ptr()  # allocated once, at its capacity: never copied
    assert cache.nbytes == 0
    cache.put(list(range(5)), torch.cat([payload[b] for b in range(5)], 2))
    assert cache.held(0) == cache.held(1) == 3 and calls == []  # blocks 2, 3, 4 stay in both
    assert cache.nbytes == 2 * 3 * 2 * 2 * 4
    # 0 is fetched for layer 0; 3, its least recently used, leaves
    slots = cache.slots(0, torch.tensor([2, 0, 4]))
    assert calls == [(0, [0])] and values(0, slots) == [2.0, 0.0, 4.0]
    assert values(1, cache.slots(1, torch.tensor([3]))) == [13.0]  # layer 1 still holds 3: no read
    cache.slots(0, torch.tensor([3]))
    assert calls == [(0, [0]), (0, [3])]  # 3 was gone from layer 0; 2 (least recent) leaves for it
    assert values(1, cache.slots(1, torch.tensor([2, 4]))) == [12.0, 14.0] and len(calls) == 2
    with pytest.raises(ValueError, match="4 blocks needed at once, the cache holds 3"):
        cache.slots(0, torch.tensor([0, 1, 3, 4]))
    assert cache.slab.data_ptr() == slab


def test_an_unbounded_block_cache_grows_and_keeps_every_block() -> None:
    from infinikv.memory.cache import BlockCache

    cache = BlockCache((1, 2, 1, 1), torch.float32, None, capacity=None)
    assert cache.nbytes == 0  # an empty slab has no slot to measure
    for b in range(7):  # one block at a time: the slab doubles, copying what it holds
        cache.put([b], torch.full((2, 1, 1, 2, 1, 1), float(b)))
    k, v = cache.layer(0)
    slots = cache.slots(0, torch.tensor(list(range(7))))
    every = [float(b) for b in range(7)]
    assert k.view(-1, 2)[slots, 1].tolist() == v.view(-1, 2)[slots, 0].tolist() == every
    assert cache.nbytes == 7 * 2 * 2 * 4 and cache.slab.shape[2] == 8
    repeated = cache.slots(0, torch.tensor([[3, 3], [0, 6]]))  # any shape, repeats allowed
    assert repeated.tolist() == [[slots[3].item()] * 2, [slots[0].item(), slots[6].item()]]
    with pytest.raises(KeyError, match="not in memory"):
        cache.slots(0, torch.tensor([7]))


def test_a_memory_bounded_in_ram_retrieves_what_an_unbounded_one_does(store) -> None:
    """Block granularity: at most 3 of 8 blocks in RAM, the rest read back from the store."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 8, 4, 3, 16, generator=g), torch.randn(2, 8, 4, 3, 16, generator=g)
    bounded = EvictedMemory(
        MemorySpec(2, 3, 16, 4, granularity="block", ram_blocks=3), store=store, prefix="sess:ram:"
    )
    everything = EvictedMemory(MemorySpec(2, 3, 16, 4, granularity="block"))
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
    assert max(bounded.cache.held(layer) for layer in range(2)) <= 3 and bounded.cache.fetched > 0
    store.put_many(snapshot.records(bounded))
    back = snapshot.load(store, "sess:ram:", ram_blocks=3)
    assert back.cache.held(0) == back.cache.held(1) == 3 and back.tokens == 32
    q = torch.randn(3, 1, 2, 16, generator=g)  # at most 3 blocks at once
    for ranking in ("bound", "sketch"):
        got_want = (retrieve_blocks(m, 0, q, 1, ranking) for m in (back, everything))
        for got, want in zip(*got_want, strict=True):
            assert torch.equal(got, want)


def test_the_ram_tier_gives_way_to_the_search_structures_within_the_budget(store) -> None:
    """The RAM tier and the search structures share a 1 MiB budget: as the sketch and the
    index grow the tier holds fewer blocks, retrieval still equals an unbounded memory's,
    and the block past the budget's capacity is refused with nothing added."""
    from infinikv.errors import MemoryFullError
    from infinikv.memory.budget import RamBudget, search_bytes
    from infinikv.memory.payload import block_key

    L, H, d, B = 2, 3, 16, 4
    budget = RamBudget(2**20, min_blocks=8)
    g = torch.Generator().manual_seed(6)
    bounded = EvictedMemory(
        MemorySpec(L, H, d, B, granularity="block", ram_budget=budget), store=store, prefix="sess:budget:"
    )
    everything = EvictedMemory(MemorySpec(L, H, d, B, granularity="block"))
    capacity = bounded.capacity
    assert capacity is not None and capacity % B == 0
    tiers = []
    while bounded.tokens < capacity:
        n = min(50, (capacity - bounded.tokens) // B)
        k, v = torch.randn(2, L, n, B, H, d, generator=g)
        start = bounded.tokens // B
        for mem in (bounded, everything):
            mem.add_blocks(list(range(start, start + n)), k, v)
        search = search_bytes(bounded.tokens, L, H, d, B, "flat")
        assert bounded.sketch is not None and bounded.sketch.nbytes + bounded.index.nbytes == search
        assert bounded.nbytes <= budget.nbytes and bounded.cache.nbytes + search <= budget.nbytes
        tiers.append(bounded.cache.capacity)
        q = torch.randn(H, 1, 2, d, generator=g)
        for ranking in ("bound", "sketch"):
            got_want = (retrieve_blocks(m, start % L, q, 4, ranking) for m in (bounded, everything))
            for got, want in zip(*got_want, strict=True):
                assert torch.equal(got, want)
    assert tiers == sorted(tiers, reverse=True) and 2**20 // (2 * L * B * H * d * 4) > tiers[0] > tiers[-1]
    assert bounded.cache.fetched > 0
    k, v = torch.randn(2, L, 1, B, H, d, generator=g)
    with pytest.raises(MemoryFullError, match=f"holds {capacity} evicted tokens \\(raise ram_budget_mb\\)"):
        bounded.add_blocks([capacity // B], k, v)
    assert bounded.tokens == capacity and bounded.index.ntotal == capacity // B
    assert bounded.sketch.tokens == capacity
    assert store.get_many([block_key("sess:budget:", capacity // B)]) == [None]


def test_lowering_the_ram_tier_s_capacity_returns_its_pages_to_the_kernel() -> None:
    """A bounded tier's slab is a mapping of its own: the slots given up leave the process's
    resident memory, and their blocks come back from the store when read."""
    from infinikv.memory.cache import BlockCache

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    shape = (2, 16, 4, 64)  # 16 KiB per (k|v, layer) slot: 64 KiB per block
    fetch_calls = []

    def fetch(layer: int, blocks: list[int]) -> torch.Tensor:
        fetch_calls.append(blocks)
        return torch.tensor(blocks, dtype=torch.float32).view(1, -1, 1, 1, 1).expand(2, -1, *shape[1:])

    cache = BlockCache(shape, torch.float32, fetch, capacity=2048)
    for start in range(0, 2048, 256):
        blocks = list(range(start, start + 256))
        kv = torch.tensor(blocks, dtype=torch.float32).view(1, 1, -1, 1, 1, 1).expand(2, 2, -1, *shape[1:])
        cache.put(blocks, kv)
    full = resident_mb()
    cache.limit(256)
    released = full - resident_mb()
    assert released > 0.9 * (2048 - 256) * 64 / 1024  # MiB: 112 of the 128 the slab held
    assert max(cache.held(layer) for layer in range(2)) <= 256 and cache.nbytes == 2 * 256 * 2**16 // 2
    k, _ = cache.layer(1)
    for block in (0, 1000, 2047):  # whichever stayed in RAM, each comes back whole
        slot = cache.slots(1, torch.tensor([block]))
        assert bool((k.view(-1, 16 * 4 * 64)[slot] == block).all())
    assert fetch_calls and all(b < 2048 for calls in fetch_calls for b in calls)
    with pytest.raises(ValueError, match="lowered to >= 1 blocks"):
        cache.limit(0)


def test_favourites_are_read_back_through_a_bounded_ram_tier(store) -> None:
    """Rankings between full ones read their favourites' keys through the RAM tier: 4 of 40
    blocks per kv-head, the tier holding 12, so favourites leave RAM and come back."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 40, 4, 3, 16, generator=g), torch.randn(2, 40, 4, 3, 16, generator=g)
    kw = dict(granularity="block", sketch_every=3)
    bounded = EvictedMemory(MemorySpec(2, 3, 16, 4, ram_blocks=12, **kw), store=store, prefix="sess:fav:")
    everything = EvictedMemory(MemorySpec(2, 3, 16, 4, **kw))
    for mem in (bounded, everything):
        mem.add_blocks(list(range(40)), k, v)
    for step in range(12):
        q = torch.randn(3, 1, 2, 16, generator=g)
        got_want = (retrieve_blocks(m, step % 2, q, 1, "sketch", step // 2) for m in (bounded, everything))
        for got, want in zip(*got_want, strict=True):
            assert torch.equal(got, want)
    assert bounded.cache.fetched > 0 and max(bounded.cache.held(layer) for layer in range(2)) <= 12
