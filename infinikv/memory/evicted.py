"""One sequence's evicted tokens: the kNN index over their keys (granularity "token") or over
one summary per block (granularity "block", see summary.py) plus their payloads in host RAM
(tier 2), addressed by block and offset; optionally written through to a block store
(tier 3) under a key prefix, with snapshots to reload after a restart."""

from __future__ import annotations

import json
import time

import torch

from infinikv.memory.index import CorruptSnapshotError, MemoryIndex, entry_id, split_id
from infinikv.memory.payload import block_key, from_bytes, to_bytes
from infinikv.memory.store import BlockStore
from infinikv.memory.summary import block_summary, summary_query

GRANULARITIES = ("token", "block")


class EvictedMemory:
    """Keys (before RoPE) and values of evicted blocks, for every layer.

    Blocks arrive oldest first with consecutive block numbers (eviction takes the oldest
    resident block after the sinks), so block b, offset o lives at row (b - first) * B + o.
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
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        index_dim = head_dim if granularity == "token" else 2 * head_dim
        self.index = MemoryIndex(num_layers, num_kv_heads, index_dim, index_kind)
        self.page_size = page_size
        self.store, self.prefix = store, prefix
        shape = (num_layers, 0, num_kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype)  # (L, rows, Hkv, d), grown by doubling
        self.values = torch.empty(shape, dtype=dtype)
        self.first_block: int | None = None
        self.tokens = 0
        self.snapshot_blocks = 0  # blocks in the index snapshot last saved to the store
        self.search_seconds = 0.0  # time spent in index searches, for metrics

    def add_blocks(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """blocks: consecutive block numbers; k, v: (L, nb, B, Hkv, d) of those blocks."""
        if not blocks:
            return
        B = self.page_size
        start = blocks[0] if self.first_block is None else self.first_block + self.tokens // B
        if blocks != list(range(start, start + len(blocks))):
            raise ValueError(f"evicted blocks must be consecutive from {start}, got {blocks}")
        if self.first_block is None:
            self.first_block = start
        n = len(blocks) * B
        self._grow(self.tokens + n)
        k_rows = k.flatten(1, 2).to(self.keys.device, self.keys.dtype)  # (L, n, Hkv, d)
        self.keys[:, self.tokens : self.tokens + n] = k_rows
        self.values[:, self.tokens : self.tokens + n] = v.flatten(1, 2).to(
            self.values.device, self.values.dtype
        )
        self._index_rows(range(blocks[0], blocks[-1] + 1))
        if self.store is not None:
            rows = slice(self.tokens, self.tokens + n)
            kb = self.keys[:, rows].unflatten(1, (len(blocks), B))  # (L, nb, B, Hkv, d)
            vb = self.values[:, rows].unflatten(1, (len(blocks), B))
            self.store.put_many(
                {
                    block_key(self.prefix, b): to_bytes(torch.stack([kb[:, i], vb[:, i]]))
                    for i, b in enumerate(blocks)
                }
            )
        self.tokens += n

    def save(self, index: bool = True) -> None:
        """Write the layout to the store (the blocks are already there) and, with `index`, a
        snapshot of the index. Without it the last snapshot stays: `load` adds the blocks
        evicted after it to the index again, so a snapshot is a cache and the blocks the truth."""
        if self.store is None:
            raise ValueError("this memory has no block store to save to")
        items = {}
        if index:
            items[f"{self.prefix}index"] = self.index.serialize()
            self.snapshot_blocks = self.tokens // self.page_size
        L, _, H, d = self.keys.shape
        meta = {
            "shape": [L, H, d],
            "page_size": self.page_size,
            "dtype": str(self.keys.dtype).removeprefix("torch."),
            "index_kind": self.index.kind,
            "granularity": self.granularity,
            "first_block": self.first_block,
            "blocks": self.tokens // self.page_size,
            "snapshot_blocks": self.snapshot_blocks,
        }
        items[f"{self.prefix}meta"] = json.dumps(meta).encode()
        self.store.put_many(items)

    @classmethod
    def load(cls, store: BlockStore, prefix: str) -> EvictedMemory:
        """Rebuild a saved memory from the store: the index snapshot plus the blocks evicted
        after it. A missing or damaged part is a CorruptSnapshotError naming the prefix
        (nothing else is touched)."""
        (meta_raw,) = store.get_many([f"{prefix}meta"])
        if meta_raw is None:
            raise CorruptSnapshotError(f"no memory snapshot under {prefix!r}")
        try:
            meta = json.loads(meta_raw)
            L, H, d = meta["shape"]
            B, dtype = int(meta["page_size"]), getattr(torch, meta["dtype"])
            made = cls(L, H, d, B, meta["index_kind"], dtype, store, prefix, meta.get("granularity", "token"))
            total, indexed = int(meta["blocks"]), int(meta["snapshot_blocks"])
            if not 0 <= indexed <= total:
                raise ValueError(f"{indexed} indexed blocks of {total}")
            if indexed:
                (index_raw,) = store.get_many([f"{prefix}index"])
                if index_raw is None:
                    raise ValueError("the index snapshot is missing")
                made.index = MemoryIndex.deserialize(index_raw)
                made.snapshot_blocks = indexed
            if total:
                first = int(meta["first_block"])
                payloads = store.get_many([block_key(prefix, b) for b in range(first, first + total)])
                if any(p is None for p in payloads):
                    raise ValueError("a block payload is missing")
                kv = torch.stack(
                    [from_bytes(p, dtype, (2, L, B, H, d)) for p in payloads if p is not None], 2
                )
                made.first_block = first
                made._grow(total * B)
                made.keys[:, : total * B] = kv[0].flatten(1, 2)
                made.values[:, : total * B] = kv[1].flatten(1, 2)
                made.tokens = total * B
                made._index_rows(range(first + indexed, first + total))
        except (CorruptSnapshotError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise CorruptSnapshotError(f"memory snapshot under {prefix!r} is corrupt: {e}") from e
        entries = made.tokens if made.granularity == "token" else made.tokens // B
        if made.index.ntotal != entries:
            raise CorruptSnapshotError(
                f"memory snapshot under {prefix!r} is inconsistent: "
                f"{made.index.ntotal} index entries for {made.tokens} stored tokens"
            )
        return made

    def _index_rows(self, blocks: range) -> None:
        """Add the keys (or block summaries) of stored `blocks` to the index."""
        if not blocks:
            return
        B, H, d = self.page_size, self.keys.shape[2], self.keys.shape[3]
        first = blocks[0] - (self.first_block or 0)
        rows = slice(first * B, (first + len(blocks)) * B)
        block_ids = torch.tensor(blocks, dtype=torch.long)
        if self.granularity == "token":
            ids = entry_id(block_ids.repeat_interleave(B), torch.arange(B).repeat(len(blocks)))
        for layer in range(self.keys.shape[0]):
            keys = self.keys[layer, rows]  # (nb * B, H, d)
            if self.granularity == "token":
                self.index.add(layer, keys, ids)
            else:
                summaries = block_summary(keys.view(len(blocks), B, H, d).transpose(1, 2))  # (nb, H, 2d)
                self.index.add(layer, summaries, block_ids)

    def retrieve(
        self, layer: int, queries: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token granularity: the top-k entries by inner product for each query.

        queries: (Hkv, nq, d), already rotated by the memory distance.
        Returns keys, values (Hkv, nq, K, d) and valid (Hkv, nq, K) bool (an approximate
        index may return fewer than K hits; those slots are invalid).
        """
        _, ids = self._search(layer, queries, top_k)  # (Hkv, nq, K)
        valid = ids >= 0
        block, offset = split_id(ids.clamp_min(0))
        rows = ((block - (self.first_block or 0)) * self.page_size + offset).where(valid, 0)
        k, v = self._gather(layer, rows)
        return k, v, valid

    def retrieve_blocks(
        self, layer: int, queries: torch.Tensor, max_blocks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block granularity: whole blocks, one set per group of queries. Every query ranks
        blocks by summary bound; a block's priority in a group is its best rank over the
        group's queries (then its best bound), so each query's favourites come before any
        query's runners-up and no single large-norm query decides alone.

        queries: (Hkv, P, m, d), rotated by the memory distance; group p's m queries share.
        Returns keys, values (Hkv, P, nb * B, d), nb = min(max_blocks, blocks in memory),
        oldest block first.
        """
        H, P, m, d = queries.shape
        scores, ids = self._search(layer, summary_query(queries).view(H, P * m, 2 * d), max_blocks)
        K = ids.shape[-1]
        B, nblocks = self.page_size, self.tokens // self.page_size
        valid = ids >= 0
        rel = (ids - (self.first_block or 0)).where(valid, 0).view(H * P, m * K)
        rank = torch.arange(K).expand_as(ids).where(valid, K).reshape(H * P, m * K)
        best_rank = torch.full((H * P, nblocks), K).scatter_reduce_(1, rel, rank, "amin")
        best_score = torch.full((H * P, nblocks), float("-inf")).scatter_reduce_(
            1, rel, scores.where(valid, float("-inf")).view(H * P, m * K), "amax"
        )
        order = best_score.argsort(dim=1, descending=True, stable=True)
        order = order.gather(1, best_rank.gather(1, order).argsort(dim=1, stable=True))
        chosen = order[:, : min(max_blocks, nblocks)].sort(dim=1).values  # (H * P, nb)
        rows = (chosen[..., None] * B + torch.arange(B)).view(H, P, -1)  # (H, P, nb * B)
        return self._gather(layer, rows)

    def _gather(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of memory rows: rows (Hkv, ...) -> (Hkv, ..., d) each."""
        H, d = self.keys.shape[2], self.keys.shape[3]
        # Row r of head h is row r * H + h of the (rows * H, d) view: one index_select each.
        flat = (rows * H + torch.arange(H).view(H, *[1] * (rows.dim() - 1))).flatten()
        k = self.keys[layer].view(-1, d).index_select(0, flat).view(*rows.shape, d)
        v = self.values[layer].view(-1, d).index_select(0, flat).view(*rows.shape, d)
        return k, v

    def _search(self, layer: int, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self.index.search(layer, queries, top_k)
        finally:
            self.search_seconds += time.perf_counter() - t0

    def delete(self) -> int:
        """Remove everything this memory wrote to the store; returns the number of keys."""
        return 0 if self.store is None else self.store.delete_prefix(self.prefix)

    def _grow(self, rows: int) -> None:
        have = self.keys.shape[1]
        if rows <= have:
            return
        size = max(rows, 2 * have)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(old.shape[0], size, *old.shape[2:], dtype=old.dtype)
            new[:, :have] = old
            setattr(self, name, new)
