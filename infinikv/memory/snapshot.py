"""A memory's snapshot in the block store: its records (layout, the ranking's favourites) for
the sequence's commit, an index snapshot under a key of its own, and the memory rebuilt from
them and its stored blocks. The blocks are the truth, an index snapshot a cache: blocks
evicted after it are indexed again on load."""

from __future__ import annotations

import json

import torch

from infinikv.core.config import RopeConfig
from infinikv.memory.budget import RamBudget
from infinikv.memory.evicted import LOAD_BATCH, EvictedMemory, MemorySpec
from infinikv.memory.favourites import Favourites
from infinikv.memory.index import CorruptSnapshotError, MemoryIndex
from infinikv.memory.payload import LAYOUT, block_key, check_layout, read_blocks
from infinikv.memory.store import BlockStore


def records(memory: EvictedMemory, index: bool = True) -> dict[str, bytes]:
    """The memory's records (layout, favourites) for the caller to commit; with `index`, a
    snapshot of the index is written first under a key of its own, which they name.
    Without it the last snapshot stays: `load` adds the blocks evicted after it to the
    index again, so a snapshot is a cache and the blocks the truth."""
    if memory.store is None:
        raise ValueError("this memory has no block store to save to")
    blocks = memory.tokens // memory.page_size
    if index and blocks != memory.snapshot_blocks:
        memory.store.put_many({index_key(memory.prefix, blocks): memory.index.serialize()})
        memory.snapshot_blocks = blocks
    L, _, H, d = memory.shape
    meta = {
        "shape": [L, H, d],
        "layout": LAYOUT,
        "page_size": memory.page_size,
        "dtype": str(memory.dtype).removeprefix("torch."),
        "index_kind": memory.index.kind,
        "granularity": memory.granularity,
        "span": memory.spec.span,
        "first_block": memory.first_block,
        "blocks": blocks,
        "snapshot_blocks": memory.snapshot_blocks,
    }
    made = {f"{memory.prefix}meta": json.dumps(meta).encode()}
    if memory.sketch is not None:  # block granularity: the ranking's favourites
        made[f"{memory.prefix}favourites"] = json.dumps(memory.favourites.records()).encode()
    return made


def referenced_keys(prefix: str, meta_raw: bytes) -> set[str]:
    """The store keys a saved memory's records (its `meta`) need besides themselves."""
    meta = json.loads(meta_raw)
    total, indexed = int(meta["blocks"]), int(meta["snapshot_blocks"])
    first = meta["first_block"] or 0
    keys = {block_key(prefix, b) for b in range(first, first + total)}
    if indexed:
        keys.add(index_key(prefix, indexed))
    return keys


def load(
    store: BlockStore,
    prefix: str,
    ram_blocks: int | None = None,
    sketch_channels: int = 16,
    device: torch.device | str = "cpu",
    sketch_every: int = 1,
    ram_budget: RamBudget | None = None,
    rope: RopeConfig | None = None,
) -> EvictedMemory:
    """Rebuild a saved memory from the store: the index snapshot plus the blocks evicted
    after it. Every block is read once (in batches) to check it; the most recent stay in
    RAM. A missing or damaged part is a CorruptSnapshotError naming the prefix (nothing
    else is touched)."""
    (meta_raw,) = store.get_many([f"{prefix}meta"])
    if meta_raw is None:
        raise CorruptSnapshotError(f"no memory snapshot under {prefix!r}")
    try:
        meta = json.loads(meta_raw)
        check_layout(meta)
        L, H, d = meta["shape"]
        B, dtype = int(meta["page_size"]), getattr(torch, meta["dtype"])
        spec = MemorySpec(
            L,
            H,
            d,
            B,
            index_kind=meta["index_kind"],
            dtype=dtype,
            granularity=meta.get("granularity", "token"),
            sketch_channels=sketch_channels,
            sketch_every=sketch_every,
            ram_blocks=ram_blocks,
            ram_budget=ram_budget,
            # The span its keys were placed with (absent before spans: 1), kept for later blocks.
            span=int(meta.get("span", 1)),
            rope=rope,
        )
        made = EvictedMemory(spec, store, prefix, device)
        total, indexed = int(meta["blocks"]), int(meta["snapshot_blocks"])
        if not 0 <= indexed <= total:
            raise ValueError(f"{indexed} indexed blocks of {total}")
        if indexed:
            (index_raw,) = store.get_many([index_key(prefix, indexed)])
            if index_raw is None:
                raise ValueError("the index snapshot is missing")
            made.index = MemoryIndex.deserialize(index_raw, device)
            made.snapshot_blocks = indexed
        if total:
            first = int(meta["first_block"])
            made.first_block = first
            made.make_room(total * B)
            for start in range(first, first + total, LOAD_BATCH):
                blocks = list(range(start, min(start + LOAD_BATCH, first + total)))
                kv = read_blocks(store, prefix, dtype, made.shape, blocks)
                new = [i for i, b in enumerate(blocks) if b >= first + indexed]  # not in the snapshot
                made.index_blocks([blocks[i] for i in new], kv[0][:, new])
                if made.sketch is not None:
                    made.sketch.append(kv[0])
                made.cache.put(blocks, kv)
            made.tokens = total * B
        (favourites,) = store.get_many([f"{prefix}favourites"])
        if favourites is not None:  # (absent from older snapshots: the next ranking is full)
            _restore_favourites(made, json.loads(favourites))
    except (CorruptSnapshotError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise CorruptSnapshotError(f"memory snapshot under {prefix!r} is corrupt: {e}") from e
    entries = made.tokens if made.granularity == "token" else made.tokens // B
    if made.index.ntotal != entries:
        raise CorruptSnapshotError(
            f"memory snapshot under {prefix!r} is inconsistent: "
            f"{made.index.ntotal} index entries for {made.tokens} stored tokens"
        )
    return made


def _restore_favourites(memory: EvictedMemory, saved: list) -> None:
    """The favourites `records` wrote: per layer [position, blocks, ranked, covered, buffer
    rows] lists; their keys are read again (a restored sequence then selects what the
    saved one would)."""
    L, B, H, _ = memory.shape
    nblocks = memory.tokens // B
    if len(saved) != L:
        raise ValueError(f"favourites for {len(saved)} layers, the memory has {L}")
    for layer, sets in enumerate(saved):
        for position, blocks, ranked, covered, rows in sets:
            ids = torch.tensor(blocks, dtype=torch.long)
            if (
                ids.dim() != 2
                or ids.shape[0] != H
                or not 0 <= int(ids.min()) <= int(ids.max()) < nblocks
                or rows < ids.numel() // H * B
                or not 0 <= ranked <= covered <= nblocks
            ):
                raise ValueError(f"layer {layer}'s favourites are not blocks of this memory")
            buffer = memory.favourites.buffer(layer, rows, memory.cache.slab.device)
            memory.block_keys(layer, ids, buffer)
            memory.favourites.sets[layer].append(
                Favourites(int(position), ids, buffer, int(ranked), int(covered))
            )


def index_key(prefix: str, blocks: int) -> str:
    """Store key of the index snapshot over a memory's first `blocks` blocks."""
    return f"{prefix}index@{blocks}"
