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
and the budget sets the longest sequence (`memory_capacity`). (Over 350 lines: the two
retrieval modes share the RAM tier's slot and row bookkeeping, which would otherwise be
passed between files on every selection.)"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from infinikv.core.config import RopeConfig
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.errors import MemoryFullError
from infinikv.memory.budget import RamBudget, memory_capacity, search_bytes
from infinikv.memory.cache import BlockCache, block_bytes
from infinikv.memory.favourites import FAVOURITES_PER_BLOCK, Favourites, FavouriteSets, best_logits
from infinikv.memory.index import MemoryIndex, entry_id, split_id
from infinikv.memory.payload import block_key, blocks_to_bytes, read_layer
from infinikv.memory.sketch import KeySketch
from infinikv.memory.store import BlockStore
from infinikv.memory.summary import block_summary, summary_query

GRANULARITIES = ("token", "block")
# How block granularity ranks blocks for a group of queries: by summary bound through the
# index, or by approximate logits over the key sketch.
RANKINGS = ("bound", "sketch")
# Blocks read per store call when a memory is loaded or read whole (bounds the memory it needs).
LOAD_BATCH = 256


@dataclass(frozen=True)
class MemorySpec:
    """What an evicted memory holds and how it is searched. With a store and `ram_blocks`, at
    most that many blocks stay in host RAM (block granularity); with `ram_budget` instead,
    the RAM tier and the search structures share its bytes (see the module's docstring)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    index_kind: str = "flat"
    dtype: torch.dtype = torch.float32
    granularity: str = "token"
    sketch_channels: int = 16  # query channels that rank blocks (block granularity)
    sketch_every: int = 1  # positions per full ranking over the key sketch (FavouriteSets)
    ram_blocks: int | None = None
    ram_budget: RamBudget | None = None
    # Keys keep their order within spans of this many tokens: the key at position j is read
    # at the memory distance D plus span - 1 - j % span (1: every key at D). Needs `rope`.
    span: int = 1
    rope: RopeConfig | None = None


def _rope_of(spec: MemorySpec) -> RopeConfig:
    if spec.rope is None:
        raise ValueError(f"a memory span of {spec.span} needs the model's RoPE config")
    return spec.rope


class EvictedMemory:
    """Keys (before RoPE) and values of evicted blocks, for every layer.

    Blocks arrive oldest first with consecutive block numbers (eviction takes the oldest
    resident block after the sinks), so token row r is offset r % B of block first + r // B.
    Only block granularity bounds the RAM tier: a token index holds every key in RAM anyway,
    and any step may read any block, so token granularity keeps them all.
    """

    def __init__(
        self,
        spec: MemorySpec,
        store: BlockStore | None = None,
        prefix: str = "",
        device: torch.device | str = "cpu",
    ):
        num_layers, num_kv_heads, head_dim, page_size = (
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
            spec.page_size,
        )
        granularity, dtype, ram_blocks, ram_budget = (
            spec.granularity,
            spec.dtype,
            spec.ram_blocks,
            spec.ram_budget,
        )
        self.spec = spec
        self.rotary = None if spec.span == 1 else RotaryEmbedding(_rope_of(spec), head_dim)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        index_dim = head_dim if granularity == "token" else 2 * head_dim
        self.index = MemoryIndex(num_layers, num_kv_heads, index_dim, spec.index_kind, device)
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
            KeySketch(num_layers, num_kv_heads, head_dim, page_size, spec.sketch_channels, device)
            if granularity == "block"
            else None
        )
        # Ranking by logits (block granularity): a layer ranks every block over the sketch
        # at one position in `sketch_every`, staggered across layers; the positions between
        # pick among that one's favourites and the blocks evicted since (_rank_by_logits).
        self.favourites = FavouriteSets(num_layers, num_kv_heads, head_dim, page_size, spec.sketch_every)
        self.first_block: int | None = None
        self.tokens = 0
        self.snapshot_blocks = 0  # blocks in the index snapshot last saved to the store
        self.search_seconds = 0.0  # time spent in index searches, for metrics

    @property
    def nbytes(self) -> int:
        """Bytes this memory holds: the cached payloads, the key sketch and the favourites'
        keys (the device's memory) and the index's vectors (host RAM, or the GPU's with a
        faiss GPU build)."""
        sketch = 0 if self.sketch is None else self.sketch.nbytes
        return self.cache.nbytes + sketch + self.favourites.nbytes + self.index.nbytes

    @property
    def capacity(self) -> int | None:
        """Most tokens this memory holds within its RAM budget (None: no budget)."""
        if self.ram_budget is None:
            return None
        L, B, H, d = self.shape
        return memory_capacity(self.ram_budget, L, H, d, B, self.index.kind, self.cache.block_bytes)

    def make_room(self, tokens: int) -> None:
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
        self.make_room(self.tokens + len(blocks) * B)
        if self.first_block is None:
            self.first_block = start
        # (2, L, nb, B, Hkv, d): rotated in the wider of the pages' and the memory's dtypes,
        # then rounded once to the memory's.
        wide = torch.promote_types(k.dtype, self.dtype)
        kv = torch.stack([self.placed(blocks, k.to(wide)), v.to(wide)]).to("cpu", self.dtype)
        if self.store is not None:
            payloads = blocks_to_bytes(kv)
            self.store.put_many({block_key(self.prefix, b): p for b, p in zip(blocks, payloads, strict=True)})
        self.index_blocks(blocks, kv[0])
        if self.sketch is not None:
            self.sketch.append(kv[0])
        self.cache.put(blocks, kv)
        self.tokens += len(blocks) * B

    def placed(self, blocks: list[int], k: torch.Tensor) -> torch.Tensor:
        """Keys k (L, nb, B, Hkv, d) of `blocks` as the memory keeps them: rotated back by
        their offset in the span, so that read at distance D each sits D + offset away."""
        if self.rotary is None:
            return k
        span, B = self.spec.span, self.page_size
        tokens = torch.tensor(blocks)[:, None] * B + torch.arange(B)  # (nb, B) positions
        back = self.rotary.at((span - 1 - tokens % span).flatten()).conj()
        return rotate(k, back.reshape(len(blocks), B, -1).to(k.device))

    def index_blocks(self, blocks: list[int], k: torch.Tensor) -> None:
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
        ranking "bound": by summary bound through the index (one search per query; a
        prefill chunk's shared blocks, by its query heads' mean queries); "sketch": by
        logits, approximate over the key sketch or exact over favourites (closer to the
        truth; for the few positions whose logits are read), group p being the queries of
        position `position` + p.
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
        (`FavouriteSets.full_ranking`) and keeps its FAVOURITES_PER_BLOCK * nb best per kv-head with
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
        favourite_sets = self.favourites
        if favourite_sets.sketch_every == 1 or keep < nb:
            assert self.sketch is not None
            return self.sketch.block_scores(layer, queries).view(H * P, -1).topk(nb, dim=1).indices
        # Positions before this forward's first are final: the last favourites chosen
        # before it are the only earlier ones a position from here on can use.
        sets = [f for f in favourite_sets.sets[layer] if f.position < position][-1:]
        favourite_sets.spare[layer] += [f.buffer for f in favourite_sets.sets[layer] if f not in sets]
        picked = []
        start = 0
        while start < P:
            at = position + start
            if not sets or favourite_sets.full_ranking(layer, at, sets[-1], nblocks, max_blocks):
                assert self.sketch is not None
                scores = self.sketch.block_scores(layer, queries[:, start : start + 1])  # (Hkv, 1, blocks)
                blocks = scores[:, 0].topk(keep, dim=1).indices.cpu()
                rows = favourite_sets.rows(max_blocks)
                buffer = favourite_sets.buffer(layer, rows, self.cache.slab.device)
                self.block_keys(layer, blocks, buffer)
                sets.append(Favourites(at, blocks, buffer, nblocks, nblocks))
            stop = start + 1
            while stop < P and (position + stop + layer) % favourite_sets.sketch_every:
                stop += 1
            favourites = sets[-1]
            if nblocks > favourites.covered:  # blocks evicted since join the favourites
                recent = torch.arange(favourites.covered, nblocks).expand(H, -1)
                n = favourites.blocks.shape[1] * self.page_size
                self.block_keys(layer, recent, favourites.buffer[:, n:])
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
        favourite_sets.sets[layer] = sets
        return torch.cat(picked, 1).view(H * P, nb)

    def block_keys(self, layer: int, blocks: torch.Tensor, out: torch.Tensor) -> None:
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
            self.block_keys(layer, blocks, out[:, start * B :])
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
