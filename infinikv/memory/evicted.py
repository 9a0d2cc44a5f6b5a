"""One sequence's evicted tokens: the kNN index over their keys (granularity "token") or over
one summary per block plus a key sketch (granularity "block", see summary.py and
sketch.py), and their payloads: the
recently used blocks in host RAM (tier 2, cache.py) in front of a block store (tier 3) that
holds every block under the sequence's key prefix, with index snapshots to reload the
memory after a restart.

With a RAM budget (block granularity with a store), the RAM tier and the search structures
(the key sketch and the index's block summaries, which grow with every evicted block)
share it: the tier gives up blocks as the search structures grow, down to what one
retrieval reads at once, and a memory that would need more is refused (MemoryFullError).
So a sequence's evicted memory holds at most its budget in host RAM however long it gets,
and the budget sets the longest sequence (`memory_capacity`)."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass

import torch

from infinikv.errors import MemoryFullError
from infinikv.memory.cache import BlockCache, block_bytes
from infinikv.memory.index import CorruptSnapshotError, MemoryIndex, entry_bytes, entry_id, split_id
from infinikv.memory.payload import (
    LAYOUT,
    block_key,
    blocks_from_bytes,
    blocks_to_bytes,
    check_layout,
    layer_range,
    layers_from_bytes,
)
from infinikv.memory.sketch import KeySketch, chunk_size, sketch_bytes
from infinikv.memory.store import BlockStore
from infinikv.memory.summary import block_summary, summary_query

GRANULARITIES = ("token", "block")
# How block granularity ranks blocks for a group of queries: by summary bound through the
# index, or by approximate logits over the key sketch.
RANKINGS = ("bound", "sketch")
# Blocks read per store call when a memory is loaded (bounds the memory a load needs).
LOAD_BATCH = 256
# Ranking by logits: the blocks per kv-head, per block selected, that a layer's full ranking
# over the key sketch keeps as its favourites for the steps until its next one.
FAVOURITES_PER_BLOCK = 4


@dataclass(frozen=True)
class RamBudget:
    """Host RAM for one sequence's evicted memory: `nbytes` for the RAM tier's blocks and the
    search structures together, the tier keeping at least `min_blocks` (one retrieval's)."""

    nbytes: int
    min_blocks: int


def search_bytes(
    tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, index_kind: str
) -> int:
    """Host bytes of block granularity's search structures over `tokens` evicted tokens: the
    key sketch and one summary (2 x head_dim) per block in every (layer, kv-head) index."""
    sketch = sketch_bytes(tokens, num_layers, num_kv_heads * head_dim, chunk_size(page_size))
    entries = tokens // page_size * num_layers * num_kv_heads
    return sketch + entries * entry_bytes(index_kind, 2 * head_dim)


def memory_capacity(
    budget: RamBudget,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    index_kind: str,
    block_bytes: int,
) -> int:
    """Most tokens (whole blocks) a block-granular memory holds within `budget`: its search
    structures plus `budget.min_blocks` blocks of `block_bytes` in the RAM tier."""

    def fits(blocks: int) -> bool:
        held = search_bytes(blocks * page_size, num_layers, num_kv_heads, head_dim, page_size, index_kind)
        return held + budget.min_blocks * block_bytes <= budget.nbytes

    low, high = 0, budget.nbytes // (num_layers * num_kv_heads * entry_bytes(index_kind, 2 * head_dim))
    while low < high:  # the most blocks that fit lie in [low, high]
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low * page_size


@dataclass(eq=False)  # compared by identity (they hold tensors)
class Favourites:
    """The blocks one layer's full ranking at one position favours (block granularity)."""

    position: int  # the position whose queries ranked every block
    blocks: torch.Tensor  # (Hkv, n) relative numbers; blocks evicted since are appended
    # (Hkv, room * B, d) float32: the keys of `blocks`, then room for more. A buffer reused
    # from set to set: long-lived tensors allocated between a step's transient ones would
    # fragment the heap (glibc kept ~500 MB of freed memory at 8k tokens).
    buffer: torch.Tensor
    ranked: int  # blocks in memory at the full ranking
    covered: int  # blocks in memory that `blocks` covers: ranked, then the ones appended

    def keys(self, page_size: int) -> torch.Tensor:
        """(Hkv, n * B, d): the keys of `blocks`."""
        return self.buffer[:, : self.blocks.shape[1] * page_size]


class EvictedMemory:
    """Keys (before RoPE) and values of evicted blocks, for every layer.

    Blocks arrive oldest first with consecutive block numbers (eviction takes the oldest
    resident block after the sinks), so token row r is offset r % B of block first + r // B.
    With a store and `ram_blocks`, at most that many blocks stay in host RAM (block
    granularity: a token index holds every key in RAM anyway, and any step may read any
    block, so token granularity keeps them all); with `ram_budget` instead, the RAM tier
    and the search structures share its bytes (see the module's docstring).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        index_kind: str = "flat",
        dtype: torch.dtype = torch.float32,
        store: BlockStore | None = None,
        prefix: str = "",
        granularity: str = "token",
        ram_blocks: int | None = None,
        sketch_channels: int = 16,
        device: torch.device | str = "cpu",
        sketch_every: int = 1,
        ram_budget: RamBudget | None = None,
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        index_dim = head_dim if granularity == "token" else 2 * head_dim
        self.index = MemoryIndex(num_layers, num_kv_heads, index_dim, index_kind, device)
        self.page_size = page_size
        self.store, self.prefix = store, prefix
        self.dtype = dtype
        self.shape = (num_layers, page_size, num_kv_heads, head_dim)
        if ram_budget is not None:
            ram_blocks = ram_budget.nbytes // block_bytes(self.shape, dtype)
        bounded = store is not None and granularity == "block" and ram_blocks is not None
        self.cache = BlockCache(
            self.shape,
            dtype,
            None if store is None else functools.partial(read_layer, store, prefix, dtype, self.shape),
            ram_blocks if bounded else None,
            device,
        )
        self.ram_budget = ram_budget if bounded else None
        self.sketch = (
            KeySketch(num_layers, num_kv_heads, head_dim, page_size, sketch_channels, device)
            if granularity == "block"
            else None
        )
        # Ranking by logits (block granularity): a layer ranks every block over the sketch
        # at one position in `sketch_every`, staggered across layers; the positions between
        # pick among that one's favourites and the blocks evicted since (_rank_by_logits).
        if sketch_every < 1:
            raise ValueError(f"sketch_every={sketch_every} must be >= 1")
        self.sketch_every = sketch_every
        # Per layer: the favourites a position from the next forward on may use (the last
        # chosen before it, then those the forward chose), and key buffers of dropped ones.
        self._favourites: list[list[Favourites]] = [[] for _ in range(num_layers)]
        self._spare_buffers: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.first_block: int | None = None
        self.tokens = 0
        self.snapshot_blocks = 0  # blocks in the index snapshot last saved to the store
        self.search_seconds = 0.0  # time spent in index searches, for metrics

    @property
    def nbytes(self) -> int:
        """Bytes this memory holds: the cached payloads, the key sketch and the favourites'
        keys (the device's memory) and the index's vectors (host RAM, or the GPU's with a
        faiss GPU build)."""
        buffers = [f.buffer for sets in self._favourites for f in sets] + sum(self._spare_buffers, [])
        favourites = sum(b.numel() * b.element_size() for b in buffers)
        sketch = 0 if self.sketch is None else self.sketch.nbytes
        return self.cache.nbytes + sketch + favourites + self.index.nbytes

    @property
    def capacity(self) -> int | None:
        """Most tokens this memory holds within its RAM budget (None: no budget)."""
        if self.ram_budget is None:
            return None
        L, B, H, d = self.shape
        return memory_capacity(self.ram_budget, L, H, d, B, self.index.kind, self.cache.block_bytes)

    def _make_room(self, tokens: int) -> None:
        """Before the memory grows to `tokens`: lower the RAM tier's capacity so that it and
        the search structures fit the RAM budget, or refuse (nothing changed) if they cannot."""
        if self.ram_budget is None:
            return
        L, B, H, d = self.shape
        search = search_bytes(tokens, L, H, d, B, self.index.kind)
        blocks = (self.ram_budget.nbytes - search) // self.cache.block_bytes
        if blocks < self.ram_budget.min_blocks:
            raise MemoryFullError(
                f"the memory of {tokens} evicted tokens does not fit its RAM budget of "
                f"{self.ram_budget.nbytes / 2**20:.0f} MB, which holds {self.capacity} "
                "evicted tokens (raise ram_budget_mb)"
            )
        self.cache.limit(blocks)  # never above the capacity it was built with

    def add_blocks(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """blocks: consecutive block numbers; k, v: (L, nb, B, Hkv, d) of those blocks."""
        if not blocks:
            return
        B = self.page_size
        start = blocks[0] if self.first_block is None else self.first_block + self.tokens // B
        if blocks != list(range(start, start + len(blocks))):
            raise ValueError(f"evicted blocks must be consecutive from {start}, got {blocks}")
        self._make_room(self.tokens + len(blocks) * B)
        if self.first_block is None:
            self.first_block = start
        kv = torch.stack([k, v]).to("cpu", self.dtype)  # (2, L, nb, B, Hkv, d)
        if self.store is not None:
            payloads = blocks_to_bytes(kv)
            self.store.put_many({block_key(self.prefix, b): p for b, p in zip(blocks, payloads, strict=True)})
        self._index_blocks(blocks, kv[0])
        if self.sketch is not None:
            self.sketch.append(kv[0])
        self.cache.put(blocks, kv)
        self.tokens += len(blocks) * B

    def save(self, index: bool = True) -> dict[str, bytes]:
        """The memory's records (layout, favourites) for the caller to commit; with `index`, a
        snapshot of the index is written first under a key of its own, which they name.
        Without it the last snapshot stays: `load` adds the blocks evicted after it to the
        index again, so a snapshot is a cache and the blocks the truth."""
        if self.store is None:
            raise ValueError("this memory has no block store to save to")
        blocks = self.tokens // self.page_size
        if index and blocks != self.snapshot_blocks:
            self.store.put_many({index_key(self.prefix, blocks): self.index.serialize()})
            self.snapshot_blocks = blocks
        L, _, H, d = self.shape
        meta = {
            "shape": [L, H, d],
            "layout": LAYOUT,
            "page_size": self.page_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "index_kind": self.index.kind,
            "granularity": self.granularity,
            "first_block": self.first_block,
            "blocks": blocks,
            "snapshot_blocks": self.snapshot_blocks,
        }
        records = {f"{self.prefix}meta": json.dumps(meta).encode()}
        if self.sketch is not None:  # block granularity: the ranking's favourites
            records[f"{self.prefix}favourites"] = json.dumps(
                [
                    [[f.position, f.blocks.tolist(), f.ranked, f.covered, f.buffer.shape[1]] for f in sets]
                    for sets in self._favourites
                ]
            ).encode()
        return records

    @staticmethod
    def referenced_keys(prefix: str, meta_raw: bytes) -> set[str]:
        """The store keys a saved memory's records (its `meta`) need besides themselves."""
        meta = json.loads(meta_raw)
        total, indexed = int(meta["blocks"]), int(meta["snapshot_blocks"])
        first = meta["first_block"] or 0
        keys = {block_key(prefix, b) for b in range(first, first + total)}
        if indexed:
            keys.add(index_key(prefix, indexed))
        return keys

    @classmethod
    def load(
        cls,
        store: BlockStore,
        prefix: str,
        ram_blocks: int | None = None,
        sketch_channels: int = 16,
        device: torch.device | str = "cpu",
        sketch_every: int = 1,
        ram_budget: RamBudget | None = None,
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
            made = cls(
                L,
                H,
                d,
                B,
                meta["index_kind"],
                dtype,
                store,
                prefix,
                meta.get("granularity", "token"),
                ram_blocks,
                sketch_channels,
                device,
                sketch_every,
                ram_budget,
            )
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
                made._make_room(total * B)
                for start in range(first, first + total, LOAD_BATCH):
                    blocks = list(range(start, min(start + LOAD_BATCH, first + total)))
                    kv = read_blocks(store, prefix, dtype, made.shape, blocks)
                    new = [i for i, b in enumerate(blocks) if b >= first + indexed]  # not in the snapshot
                    made._index_blocks([blocks[i] for i in new], kv[0][:, new])
                    if made.sketch is not None:
                        made.sketch.append(kv[0])
                    made.cache.put(blocks, kv)
                made.tokens = total * B
            (favourites,) = store.get_many([f"{prefix}favourites"])
            if favourites is not None:  # (absent from older snapshots: the next ranking is full)
                made._restore_favourites(json.loads(favourites))
        except (CorruptSnapshotError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise CorruptSnapshotError(f"memory snapshot under {prefix!r} is corrupt: {e}") from e
        entries = made.tokens if made.granularity == "token" else made.tokens // B
        if made.index.ntotal != entries:
            raise CorruptSnapshotError(
                f"memory snapshot under {prefix!r} is inconsistent: "
                f"{made.index.ntotal} index entries for {made.tokens} stored tokens"
            )
        return made

    def _restore_favourites(self, saved: list) -> None:
        """The favourites `save` wrote: per layer [position, blocks, ranked, covered, buffer
        rows] lists; their keys are read again (a restored sequence then selects what the
        saved one would)."""
        L, B, H, _ = self.shape
        nblocks = self.tokens // B
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
                buffer = self._favourites_buffer(layer, rows)
                self._block_keys(layer, ids, buffer)
                self._favourites[layer].append(
                    Favourites(int(position), ids, buffer, int(ranked), int(covered))
                )

    def _index_blocks(self, blocks: list[int], k: torch.Tensor) -> None:
        """Add the keys (or block summaries) of `blocks` to the index; k (L, nb, B, Hkv, d)."""
        if not blocks:
            return
        L, B, H, d = self.shape
        block_ids = torch.tensor(blocks, dtype=torch.long)
        ids = entry_id(block_ids.repeat_interleave(B), torch.arange(B).repeat(len(blocks)))
        for layer in range(L):
            if self.granularity == "token":
                self.index.add(layer, k[layer].reshape(-1, H, d), ids)
            else:
                self.index.add(layer, block_summary(k[layer].transpose(1, 2)), block_ids)  # (nb, H, 2d)

    def select(self, layer: int, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token granularity: the top-k entries by inner product for each query.

        queries: (Hkv, nq, d), already rotated by the memory distance.
        Returns slab rows (Hkv, nq, K) of `slab(layer)` (`gather` reads them) and valid
        (Hkv, nq, K) bool: an approximate index may return fewer than K hits; an invalid
        slot names a real row (read, then masked)."""
        _, ids = self._search(layer, queries, top_k)  # (Hkv, nq, K)
        valid = ids >= 0
        block, offset = split_id(ids.clamp_min(0))
        rows = ((block - (self.first_block or 0)) * self.page_size + offset).where(valid, 0)
        return self.slab_rows(layer, rows), valid

    def select_blocks(
        self, layer: int, queries: torch.Tensor, max_blocks: int, ranking: str, position: int = 0
    ) -> torch.Tensor:
        """Block granularity: whole blocks, one set per group of queries.

        queries: (Hkv, P, m, d) float32, rotated by the memory distance; group p's m queries
        share, on any device (the index searches on the host, the sketch on its own).
        ranking "bound": by summary bound through the index (cheap for large groups, such as
        a prefill chunk's positions); "sketch": by logits, approximate over the key sketch
        or exact over favourites (closer to the truth; for the few positions whose logits
        are read), group p being the queries of position `position` + p.
        Returns slab rows (Hkv, P, nb * B) of `slab(layer)` (`gather` reads them), nb =
        min(max_blocks, blocks in memory), oldest block first."""
        return self._block_rows(layer, self.rank_blocks(layer, queries, max_blocks, ranking, position))

    def top_tokens(self, layer: int, queries: torch.Tensor, top_k: int) -> torch.Tensor:
        """Block granularity, each query its own tokens: the top_k evicted keys by approximate
        logit over the key sketch (all channels), in position order. queries (Hkv, n, d)
        float32, rotated by the memory distance. Returns memory rows (Hkv, n, K) for
        `slab_rows`, K = min(top_k, tokens)."""
        assert self.sketch is not None
        scores = self.sketch.token_logits(layer, queries).bfloat16().float()  # (Hkv, n, tokens)
        K = min(top_k, self.tokens)
        return scores.topk(K, dim=-1, sorted=False).indices.sort(dim=-1).values.cpu()

    def rank_blocks(
        self, layer: int, queries: torch.Tensor, max_blocks: int, ranking: str, position: int = 0
    ) -> torch.Tensor:
        """The blocks `select_blocks` selects, as relative block numbers (Hkv, P, nb), in
        ascending order."""
        if ranking not in RANKINGS:
            raise ValueError(f"ranking {ranking!r} is not one of {', '.join(RANKINGS)}")
        H, P = queries.shape[:2]
        nb = min(max_blocks, self.tokens // self.page_size)
        if ranking == "sketch" and self.sketch is not None:
            best = self._rank_by_logits(layer, queries, nb, max_blocks, position)
        else:
            best = self._order_by_bound(layer, queries, max_blocks)[:, :nb]
        return best.sort(dim=1).values.cpu().view(H, P, -1)

    def _rank_by_logits(
        self, layer: int, queries: torch.Tensor, nb: int, max_blocks: int, position: int
    ) -> torch.Tensor:
        """The nb best blocks (relative numbers, (Hkv * P, nb)) for each group of queries
        (Hkv, P, m, d), the queries of positions position, position + 1, ..., by their best
        logit over the block's tokens and the group's queries.

        With sketch_every 1 every group ranks every block over the sketch (linear in the
        memory). Otherwise a group ranks that way only at its layer's full positions
        (`_full_ranking`) and keeps its FAVOURITES_PER_BLOCK * nb best per kv-head with
        their keys; every group picks by exact logits among the favourites of the last full
        position at or before its own and the blocks evicted since: consecutive positions'
        queries favour mostly the same blocks. Favourites are a function of position (not
        of how positions are batched into forwards), so a speculative verification picks
        what plain decoding picks, and a position fed again (a rejected draft's) replaces
        the favourites it chose."""
        H, P, m, d = queries.shape
        nblocks = self.tokens // self.page_size
        # As many favourites as the RAM tier holds at once (their keys are read together).
        keep = min(nblocks, FAVOURITES_PER_BLOCK * nb, (self.cache.capacity or nblocks) // H)
        if self.sketch_every == 1 or keep < nb:
            assert self.sketch is not None
            return self.sketch.block_scores(layer, queries).view(H * P, -1).topk(nb, dim=1).indices
        # Positions before this forward's first are final: the last favourites chosen
        # before it are the only earlier ones a position from here on can use.
        sets = [f for f in self._favourites[layer] if f.position < position][-1:]
        self._spare_buffers[layer] += [f.buffer for f in self._favourites[layer] if f not in sets]
        picked = []
        start = 0
        while start < P:
            at = position + start
            if not sets or self._full_ranking(layer, at, sets[-1], nblocks, max_blocks):
                assert self.sketch is not None
                scores = self.sketch.block_scores(layer, queries[:, start : start + 1])  # (Hkv, 1, blocks)
                blocks = scores[:, 0].topk(keep, dim=1).indices.cpu()
                buffer = self._favourites_buffer(layer, self._favourites_rows(max_blocks))
                self._block_keys(layer, blocks, buffer)
                sets.append(Favourites(at, blocks, buffer, nblocks, nblocks))
            stop = start + 1
            while stop < P and (position + stop + layer) % self.sketch_every:
                stop += 1
            favourites = sets[-1]
            if nblocks > favourites.covered:  # blocks evicted since join the favourites
                recent = torch.arange(favourites.covered, nblocks).expand(H, -1)
                n = favourites.blocks.shape[1] * self.page_size
                self._block_keys(layer, recent, favourites.buffer[:, n:])
                favourites.blocks = torch.cat([favourites.blocks, recent], 1)
                favourites.covered = nblocks
            keys = favourites.keys(self.page_size)
            scores = best_logits(queries[:, start:stop], keys, self.page_size)  # (Hkv, n, blocks)
            # Rounded to bfloat16 (as the sketch's scores), ties to the first favourite: a
            # forward batching other positions moves the queries by float noise (~1e-7),
            # which must not reorder blocks with equal logits (repeated text's keys).
            rounded = scores.bfloat16().float()
            best = rounded.argsort(dim=-1, descending=True, stable=True)[..., :nb].cpu()  # (Hkv, n, nb)
            picked.append(favourites.blocks.gather(1, best.flatten(1)).view_as(best))
            start = stop
        self._favourites[layer] = sets
        return torch.cat(picked, 1).view(H * P, nb)

    def _full_ranking(
        self, layer: int, position: int, last: Favourites, nblocks: int, max_blocks: int
    ) -> bool:
        """Whether `layer` ranks every block at `position`: once in sketch_every positions,
        staggered across layers (a few layers per step), when the memory grew by max_blocks
        since its last favourites were chosen, and when those were chosen for another
        max_blocks (restored from a memory with other settings: too few, or no room)."""
        return (
            (position + layer) % self.sketch_every == 0
            or nblocks - last.ranked >= max_blocks
            or last.buffer.shape[1] != self._favourites_rows(max_blocks)
        )

    def _favourites_rows(self, max_blocks: int) -> int:
        """Key rows of a favourites buffer: the most favourites and the blocks evicted until
        the growth rule ranks in full again (one size, so a dropped set's buffer always fits)."""
        return (FAVOURITES_PER_BLOCK + 1) * max_blocks * self.page_size

    def _favourites_buffer(self, layer: int, rows: int) -> torch.Tensor:
        """A key buffer (Hkv, rows, d) float32 for a new favourites set of `layer`: a
        dropped set's when one has that size, else a new one (kept for reuse)."""
        spare = self._spare_buffers[layer]
        for i, buffer in enumerate(spare):
            if buffer.shape[1] == rows:
                return spare.pop(i)
        _, _, H, d = self.shape
        return torch.empty(H, rows, d, device=self.cache.slab.device)

    def _block_keys(self, layer: int, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the keys (before RoPE) of blocks (Hkv, n), relative numbers, each head its
        own, into the start of out (Hkv, >= n * B, d), from the RAM tier (reading the blocks
        not there)."""
        H, n = blocks.shape
        rows = self._block_rows(layer, blocks)  # (Hkv, n * B)
        keys = self.slab(layer)[0].index_select(0, rows.flatten()).view(H, rows.shape[1], -1)
        out[:, : rows.shape[1]].copy_(keys)

    def keys(self, layer: int) -> torch.Tensor:
        """(Hkv, tokens, d) float32: every evicted key (before RoPE) of `layer`, oldest first,
        read through the RAM tier a batch of blocks at a time (for oracles and evaluation:
        a decode step never reads them all)."""
        L, B, H, d = self.shape
        nblocks = self.tokens // B
        out = torch.empty(H, nblocks * B, d, device=self.cache.slab.device)
        batch = max(1, min(LOAD_BATCH, (self.cache.capacity or nblocks) // H))
        for start in range(0, nblocks, batch):
            blocks = torch.arange(start, min(start + batch, nblocks)).expand(H, -1)
            self._block_keys(layer, blocks, out[:, start * B :])
        return out

    def _order_by_bound(self, layer: int, queries: torch.Tensor, max_blocks: int) -> torch.Tensor:
        """Blocks (relative numbers) in the order group (Hkv, P) prefers them, (Hkv * P, blocks).
        Every query ranks its top max_blocks by summary bound; a block's priority in a group
        is its best rank over the group's queries (then its best bound), so each query's
        favourites come before any query's runners-up and no large-norm query decides alone."""
        H, P, m, d = queries.shape
        scores, ids = self._search(layer, summary_query(queries).view(H, P * m, 2 * d), max_blocks)
        K = ids.shape[-1]
        nblocks = self.tokens // self.page_size
        valid = ids >= 0
        rel = (ids - (self.first_block or 0)).where(valid, 0).view(H * P, m * K)
        rank = torch.arange(K).expand_as(ids).where(valid, K).reshape(H * P, m * K)
        best_rank = torch.full((H * P, nblocks), K).scatter_reduce_(1, rel, rank, "amin")
        best_score = torch.full((H * P, nblocks), float("-inf")).scatter_reduce_(
            1, rel, scores.where(valid, float("-inf")).view(H * P, m * K), "amax"
        )
        order = best_score.argsort(dim=1, descending=True, stable=True)
        return order.gather(1, best_rank.gather(1, order).argsort(dim=1, stable=True))

    def slab_rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Memory rows (Hkv, ...) -> rows of the `slab(layer)` views, reading the blocks not
        in RAM first (valid until the next selection). Memory row r of head h is offset
        r % B of the (r // B)-th evicted block."""
        B = self.page_size
        slots = self._slots(layer, rows.div(B, rounding_mode="floor"))
        return self._head_rows(slots * B + rows % B)

    def _block_rows(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Evicted blocks (Hkv, ..., n), relative numbers -> rows (Hkv, ..., n * B) of the
        `slab(layer)` views holding their tokens, reading the blocks not in RAM first."""
        B = self.page_size
        return self._head_rows((self._slots(layer, blocks)[..., None] * B + torch.arange(B)).flatten(-2))

    def _slots(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """The RAM tier's slots (same shape) holding `layer` of relative blocks."""
        return self.cache.slots(layer, blocks + (self.first_block or 0))

    def _head_rows(self, cached: torch.Tensor) -> torch.Tensor:
        """Rows (Hkv, ...) of the cache slab (slot * B + offset), each head its own -> rows
        of the (rows * Hkv, d) slab views: row r of head h is r * Hkv + h."""
        H = self.shape[2]
        flat = cached * H + torch.arange(H).view(H, *[1] * (cached.dim() - 1))
        return flat.to(self.cache.slab.device)

    def slab(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (before RoPE) and values of `layer` in RAM: (rows, d) views that `select`
        and `select_blocks` index. Valid until the next selection (it may evict blocks)."""
        return self.cache.layer(layer)

    def gather(self, layer: int, slab_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slab rows (Hkv, ...) -> (Hkv, ..., d) each: one index_select each."""
        k_slab, v_slab = self.slab(layer)
        flat = slab_rows.flatten()
        return (
            k_slab.index_select(0, flat).view(*slab_rows.shape, -1),
            v_slab.index_select(0, flat).view(*slab_rows.shape, -1),
        )

    def _search(self, layer: int, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self.index.search(layer, queries, top_k)
        finally:
            self.search_seconds += time.perf_counter() - t0

    def delete(self) -> int:
        """Remove everything this memory wrote to the store; returns the number of keys."""
        return 0 if self.store is None else self.store.delete_prefix(self.prefix)


def index_key(prefix: str, blocks: int) -> str:
    """Store key of the index snapshot over a memory's first `blocks` blocks."""
    return f"{prefix}index@{blocks}"


def best_logits(queries: torch.Tensor, keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """queries (Hkv, P, m, d), keys (Hkv, n * B, d) of n blocks -> (Hkv, P, n): each block's
    best logit over its tokens and each group's m queries."""
    H, P, m, d = queries.shape
    logits = torch.bmm(queries.reshape(H, P * m, d), keys.transpose(1, 2))  # (Hkv, P * m, n * B)
    best = logits.view(H * P, m, -1).amax(1)  # over the group's queries
    return best.view(H, P, -1, page_size).amax(-1)  # over each block's tokens


def read_blocks(
    store: BlockStore, prefix: str, dtype: torch.dtype, shape: tuple[int, int, int, int], blocks: list[int]
) -> torch.Tensor:
    """Payloads (2, L, n, B, Hkv, d) of a memory's stored blocks, in one store call."""
    payloads = store.get_many([block_key(prefix, b) for b in blocks])
    return blocks_from_bytes(_found(payloads, blocks, prefix), dtype, shape)


def read_layer(
    store: BlockStore,
    prefix: str,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int],
    layer: int,
    blocks: list[int],
) -> torch.Tensor:
    """One layer (2, n, B, Hkv, d) of a memory's stored blocks, in one store call. A function
    of the store and prefix, not a method: the RAM tier calls it, and a bound method would
    make memory and tier a reference cycle that only the cyclic GC frees."""
    slices = store.get_slices([block_key(prefix, b) for b in blocks], *layer_range(layer, dtype, shape))
    return layers_from_bytes(_found(slices, blocks, prefix), dtype, shape)


def _found(payloads: list[bytes | None], blocks: list[int], prefix: str) -> list[bytes]:
    missing = [b for b, p in zip(blocks, payloads, strict=True) if p is None]
    if missing:
        raise CorruptSnapshotError(f"memory blocks {missing[:5]} are missing under {prefix!r}")
    return [p for p in payloads if p is not None]
