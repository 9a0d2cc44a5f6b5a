"""One sequence's evicted tokens: the kNN index over their keys plus their payloads in
host RAM (tier 2), addressed by the same (block, offset) ids."""

from __future__ import annotations

import torch

from infinikv.memory.index import MemoryIndex, entry_id, split_id


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
    ):
        self.index = MemoryIndex(num_layers, num_kv_heads, head_dim, index_kind)
        self.page_size = page_size
        shape = (num_layers, 0, num_kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype)  # (L, rows, Hkv, d), grown by doubling
        self.values = torch.empty(shape, dtype=dtype)
        self.first_block: int | None = None
        self.next_block: int | None = None
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.tokens * self.keys[0, :1].numel() * self.keys.shape[0] * self.keys.element_size()

    def add_blocks(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """blocks: consecutive block numbers; k, v: (L, nb, B, Hkv, d) of those blocks."""
        if not blocks:
            return
        if self.next_block is not None and blocks[0] != self.next_block:
            raise ValueError(
                f"evicted blocks must be consecutive: expected {self.next_block}, got {blocks[0]}"
            )
        if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
            raise ValueError(f"evicted blocks must be consecutive, got {blocks}")
        if self.first_block is None:
            self.first_block = blocks[0]
        self.next_block = blocks[-1] + 1
        B = self.page_size
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
        self.tokens += n

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
        heads = torch.arange(queries.shape[0])[:, None, None]  # (Hkv, 1, 1)
        return self.keys[layer][rows, heads], self.values[layer][rows, heads], valid
