"""One sequence's evicted tokens: the kNN index over their keys plus their payloads in
host RAM (tier 2), addressed by the same (block, offset) ids; optionally written through
to a block store (tier 3) under a key prefix, with snapshots to reload after a restart."""

from __future__ import annotations

import json

import torch

from infinikv.memory.index import CorruptSnapshotError, MemoryIndex, entry_id, split_id
from infinikv.memory.store import BlockStore

# Raw payload bytes go through an integer view of the same width (numpy has no bfloat16).
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(_BITS[t.dtype]).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=_BITS[dtype])
    return raw.view(dtype).view(shape)


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
    ):
        self.index = MemoryIndex(num_layers, num_kv_heads, head_dim, index_kind)
        self.page_size = page_size
        self.store, self.prefix = store, prefix
        shape = (num_layers, 0, num_kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype)  # (L, rows, Hkv, d), grown by doubling
        self.values = torch.empty(shape, dtype=dtype)
        self.first_block: int | None = None
        self.tokens = 0

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
        ids = entry_id(torch.tensor(blocks).repeat_interleave(B), torch.arange(B).repeat(len(blocks)))
        for layer in range(k_rows.shape[0]):
            self.index.add(layer, k_rows[layer], ids)
        if self.store is not None:
            rows = slice(self.tokens, self.tokens + n)
            kb = self.keys[:, rows].unflatten(1, (len(blocks), B))  # (L, nb, B, Hkv, d)
            vb = self.values[:, rows].unflatten(1, (len(blocks), B))
            self.store.put_many(
                {
                    self._block_key(b): _to_bytes(torch.stack([kb[:, i], vb[:, i]]))
                    for i, b in enumerate(blocks)
                }
            )
        self.tokens += n

    def _block_key(self, block: int) -> str:
        return f"{self.prefix}block:{block}"

    def save(self) -> None:
        """Snapshot the index and the layout to the store (the blocks are already there)."""
        if self.store is None:
            raise ValueError("this memory has no block store to save to")
        L, _, H, d = self.keys.shape
        meta = {
            "shape": [L, H, d],
            "page_size": self.page_size,
            "dtype": str(self.keys.dtype).removeprefix("torch."),
            "first_block": self.first_block,
            "blocks": (self.tokens // self.page_size),
        }
        self.store.put_many(
            {f"{self.prefix}meta": json.dumps(meta).encode(), f"{self.prefix}index": self.index.serialize()}
        )

    @classmethod
    def load(cls, store: BlockStore, prefix: str) -> EvictedMemory:
        """Rebuild a saved memory from the store; a missing or damaged part is a
        CorruptSnapshotError naming the prefix (nothing else is touched)."""
        meta_raw, index_raw = store.get_many([f"{prefix}meta", f"{prefix}index"])
        if meta_raw is None or index_raw is None:
            raise CorruptSnapshotError(f"no memory snapshot under {prefix!r}")
        try:
            meta = json.loads(meta_raw)
            L, H, d = meta["shape"]
            B, dtype = meta["page_size"], getattr(torch, meta["dtype"])
            made = cls(L, H, d, B, dtype=dtype, store=store, prefix=prefix)
            made.index = MemoryIndex.deserialize(index_raw)
            if meta["blocks"]:
                first = int(meta["first_block"])
                blocks = list(range(first, first + int(meta["blocks"])))
                payloads = store.get_many([made._block_key(b) for b in blocks])
                if any(p is None for p in payloads):
                    raise ValueError("a block payload is missing")
                kv = torch.stack(
                    [_from_bytes(p, dtype, (2, L, B, H, d)) for p in payloads if p is not None], 2
                )
                made.first_block = first
                made._grow(len(blocks) * B)
                made.keys[:, : len(blocks) * B] = kv[0].flatten(1, 2)
                made.values[:, : len(blocks) * B] = kv[1].flatten(1, 2)
                made.tokens = len(blocks) * B
        except (CorruptSnapshotError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise CorruptSnapshotError(f"memory snapshot under {prefix!r} is corrupt: {e}") from e
        if made.index.ntotal != made.tokens:
            raise CorruptSnapshotError(
                f"memory snapshot under {prefix!r} is inconsistent: "
                f"{made.index.ntotal} indexed, {made.tokens} stored"
            )
        return made

    def retrieve_blocks(
        self, layer: int, queries: torch.Tensor, top_k: int, max_blocks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks for a group of queries: each kv-head's queries search their top-k tokens; the
        blocks holding the best hits (ranked by their best score over all the queries) are
        returned whole, shared by every query of that head.

        queries: (Hkv, nq, d), rotated by the memory distance. Returns keys, values
        (Hkv, nb * B, d), nb = min(max_blocks, blocks in memory), oldest block first.
        """
        scores, ids = self.index.search(layer, queries, top_k)  # (Hkv, nq, K)
        H, B, d = queries.shape[0], self.page_size, queries.shape[2]
        nblocks = self.tokens // B
        rel_block = (split_id(ids.clamp_min(0))[0] - (self.first_block or 0)).where(ids >= 0, 0)
        best = torch.full((H, nblocks), float("-inf"))
        best.scatter_reduce_(
            1, rel_block.flatten(1), scores.where(ids >= 0, float("-inf")).flatten(1), "amax"
        )
        nb = min(max_blocks, nblocks)
        chosen = best.topk(nb, dim=1).indices.sort(dim=1).values  # (H, nb)
        rows = (chosen[..., None] * B + torch.arange(B)).flatten(1)  # (H, nb * B)
        flat = (rows * H + torch.arange(H)[:, None]).flatten()
        k = self.keys[layer].view(-1, d).index_select(0, flat).view(H, nb * B, d)
        v = self.values[layer].view(-1, d).index_select(0, flat).view(H, nb * B, d)
        return k, v

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

    def retrieve(
        self, layer: int, queries: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-k entries by inner product for each query.

        queries: (Hkv, nq, d), already rotated by the memory distance.
        Returns keys, values (Hkv, nq, K, d) and valid (Hkv, nq, K) bool (an approximate
        index may return fewer than K hits; those slots are invalid).
        """
        _, ids = self.index.search(layer, queries, top_k)  # (Hkv, nq, K)
        valid = ids >= 0
        block, offset = split_id(ids.clamp_min(0))
        rows = ((block - (self.first_block or 0)) * self.page_size + offset).where(valid, 0)
        H, d = self.keys.shape[2], self.keys.shape[3]
        # Row r of head h is row r * H + h of the (rows * H, d) view: one index_select each.
        flat = (rows * H + torch.arange(H)[:, None, None]).flatten()  # (Hkv * nq * K,)
        k = self.keys[layer].view(-1, d).index_select(0, flat).view(*rows.shape, d)
        v = self.values[layer].view(-1, d).index_select(0, flat).view(*rows.shape, d)
        return k, v, valid
