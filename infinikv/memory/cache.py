"""Tier 2 of the memory: evicted blocks' keys and values in host RAM, a bounded number of
blocks, least recently used first out; the block store (tier 3) holds every block and
serves the misses, all of one retrieval in one batched read.

The blocks live in one slab (keys and values of every layer, one slot per block), so a
retrieval gathers its rows with one index_select per layer, as from a plain tensor."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch

Fetch = Callable[[list[int]], torch.Tensor]  # blocks -> their payloads (2, L, n, B, Hkv, d)


class BlockCache:
    def __init__(
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        fetch: Fetch | None,
        capacity: int | None,
        device: torch.device | str = "cpu",
    ):
        """shape (L, B, Hkv, d) of one block per k and v; `fetch` reads blocks from the store;
        capacity: most blocks held (None: unbounded, nothing ever leaves: no store behind);
        device: where the slab lives (the GPU's memory when the kernels read it there)."""
        if capacity is not None and (capacity < 1 or fetch is None):
            raise ValueError(f"a bounded cache needs a capacity >= 1 and a store, got {capacity}")
        self.shape, self.capacity, self._fetch = shape, capacity, fetch
        L, B, H, d = shape
        # A bounded cache allocates its whole slab at once, never to be copied: host pages
        # become resident only when a slot is first written. An unbounded one doubles.
        slots = capacity or 0
        self.slab = torch.empty(2, L, slots, B, H, d, dtype=dtype, device=device)  # (k|v, L, slot, B, Hkv, d)
        self._slot: OrderedDict[int, int] = OrderedDict()  # block -> slot, least recent first
        self._used = 0  # slots ever handed out: slots [0, _used) hold blocks
        self.fetched = 0  # blocks read back from the store

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (the slab beyond them is not touched yet)."""
        return self._used * 2 * math.prod(self.shape) * self.slab.element_size()  # k and v per slot

    def __len__(self) -> int:
        return len(self._slot)

    def put(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Newly evicted blocks with their payloads kv (2, L, n, B, Hkv, d)."""
        keep = blocks if self.capacity is None else blocks[-self.capacity :]
        slots = self._take(len(keep), protected=set())
        for block, slot in zip(keep, slots, strict=True):
            self._slot[block] = slot
        self.slab[:, :, slots] = kv[:, :, len(blocks) - len(keep) :].to(self.slab)

    def slots(self, blocks: list[int]) -> torch.Tensor:
        """Slots holding `blocks` (distinct), reading the missing ones from the store."""
        if self.capacity is not None and len(blocks) > self.capacity:
            raise ValueError(f"{len(blocks)} blocks needed at once, the cache holds {self.capacity}")
        missing = [b for b in blocks if b not in self._slot]
        for b in blocks:
            if b in self._slot:
                self._slot.move_to_end(b)
        if missing:
            if self._fetch is None:
                raise KeyError(f"blocks {missing[:5]} are not in memory")
            kv = self._fetch(missing)
            self.fetched += len(missing)
            fresh = self._take(len(missing), protected=set(blocks))
            for block, slot in zip(missing, fresh, strict=True):
                self._slot[block] = slot
            self.slab[:, :, fresh] = kv.to(self.slab)
        return torch.tensor([self._slot[b] for b in blocks], dtype=torch.long)

    def _take(self, n: int, protected: set[int]) -> list[int]:
        """n free slots: never used ones (up to the capacity), then the least recently used
        blocks' (never a protected block's)."""
        fresh = n if self.capacity is None else min(n, self.capacity - self._used)
        have = self.slab.shape[2]
        if self._used + fresh > have:  # unbounded: grow by doubling
            slab = self.slab.new_empty(
                *self.slab.shape[:2], max(self._used + fresh, 2 * have), *self.slab.shape[3:]
            )
            slab[:, :, :have] = self.slab
            self.slab = slab
        taken = list(range(self._used, self._used + fresh))
        self._used += fresh
        victims = (b for b in list(self._slot) if b not in protected)
        while len(taken) < n:
            taken.append(self._slot.pop(next(victims)))
        return taken

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer`: (slots * B * Hkv, d) views, row (slot * B + offset) * Hkv + h."""
        d = self.shape[-1]
        return self.slab[0, layer].view(-1, d), self.slab[1, layer].view(-1, d)
