"""Tier 2 of the memory: evicted blocks' keys and values in host RAM, a bounded number of
blocks per layer, least recently used first out; the block store (tier 3) holds every
block and serves the misses, all of one layer's retrieval in one batched read.

The blocks live in one slab (keys and values, per layer a slot per block), so a retrieval
gathers its rows with one index_select per layer, as from a plain tensor."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable

import torch

Fetch = Callable[[int, list[int]], torch.Tensor]  # layer, blocks -> that layer's payloads (2, n, B, Hkv, d)


class BlockCache:
    def __init__(
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        fetch: Fetch | None,
        capacity: int | None,
        device: torch.device | str = "cpu",
    ):
        """shape (L, B, Hkv, d) of one block per k and v; `fetch` reads one layer of blocks
        from the store; capacity: most blocks each layer holds (None: unbounded, nothing
        ever leaves: no store behind); device: where the slab lives (the GPU's memory when
        the kernels read it there).

        Each layer keeps its own blocks, least recently used first out: the layers of one
        step retrieve different blocks, so a block that one layer reads does not hold RAM
        in the others (at 32k tokens of SmolLM2 over a 23k-token budget, whole-block slots
        missed ~23 blocks of every layer per decoded token)."""
        if capacity is not None and (capacity < 1 or fetch is None):
            raise ValueError(f"a bounded cache needs a capacity >= 1 and a store, got {capacity}")
        self.shape, self.capacity, self._fetch = shape, capacity, fetch
        L, B, H, d = shape
        # A bounded cache allocates its whole slab at once, never to be copied: host pages
        # become resident only when a slot is first written. An unbounded one doubles.
        slots = capacity or 0
        self.slab = torch.empty(2, L, slots, B, H, d, dtype=dtype, device=device)  # (k|v, L, slot, B, Hkv, d)
        # Per layer: block -> slot, least recent first; slots [0, used) hold blocks.
        self._slot: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(L)]
        self._used = [0] * L
        self.fetched = 0  # blocks' layers read back from the store

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (the slab beyond them is not touched yet)."""
        _, B, H, d = self.shape
        return sum(self._used) * 2 * B * H * d * self.slab.element_size()  # k and v per slot

    def held(self, layer: int) -> int:
        """Blocks `layer` holds."""
        return len(self._slot[layer])

    def put(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Newly evicted blocks with their payloads kv (2, L, n, B, Hkv, d), into every layer."""
        keep = blocks if self.capacity is None else blocks[-self.capacity :]
        for layer in range(self.shape[0]):
            slots = self._take(layer, len(keep), protected=set())
            for block, slot in zip(keep, slots, strict=True):
                self._slot[layer][block] = slot
            self.slab[:, layer, slots] = kv[:, layer, len(blocks) - len(keep) :].to(self.slab)

    def slots(self, layer: int, blocks: list[int]) -> torch.Tensor:
        """Slots holding `layer` of `blocks` (distinct), reading the missing ones from the store."""
        if self.capacity is not None and len(blocks) > self.capacity:
            raise ValueError(f"{len(blocks)} blocks needed at once, the cache holds {self.capacity}")
        held = self._slot[layer]
        missing = [b for b in blocks if b not in held]
        for b in blocks:
            if b in held:
                held.move_to_end(b)
        if missing:
            if self._fetch is None:
                raise KeyError(f"blocks {missing[:5]} are not in memory")
            kv = self._fetch(layer, missing)
            self.fetched += len(missing)
            fresh = self._take(layer, len(missing), protected=set(blocks))
            for block, slot in zip(missing, fresh, strict=True):
                held[block] = slot
            self.slab[:, layer, fresh] = kv.to(self.slab)
        return torch.tensor([held[b] for b in blocks], dtype=torch.long)

    def _take(self, layer: int, n: int, protected: set[int]) -> list[int]:
        """n free slots of `layer`: never used ones (up to the capacity), then the least
        recently used blocks' (never a protected block's)."""
        used = self._used[layer]
        fresh = n if self.capacity is None else min(n, self.capacity - used)
        have = self.slab.shape[2]
        if used + fresh > have:  # unbounded: grow by doubling
            slab = self.slab.new_empty(
                *self.slab.shape[:2], max(used + fresh, 2 * have), *self.slab.shape[3:]
            )
            slab[:, :, :have] = self.slab
            self.slab = slab
        taken = list(range(used, used + fresh))
        self._used[layer] += fresh
        held = self._slot[layer]
        victims = itertools.islice((b for b in held if b not in protected), n - len(taken))  # oldest first
        for block in list(victims):  # read only as far as needed, not the whole tier
            taken.append(held.pop(block))
        return taken

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer`: (slots * B * Hkv, d) views, row (slot * B + offset) * Hkv + h."""
        d = self.shape[-1]
        return self.slab[0, layer].view(-1, d), self.slab[1, layer].view(-1, d)
