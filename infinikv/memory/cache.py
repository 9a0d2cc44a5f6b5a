"""Tier 2 of the memory: evicted blocks' keys and values in host RAM, a bounded number of
blocks per layer, least recently used first out; the block store (tier 3) holds every
block and serves the misses, all of one layer's retrieval in one batched read.

The blocks live in one slab (keys and values, per layer a slot per block), so a retrieval
gathers its rows with one index_select per layer, as from a plain tensor. A bounded slab in
host RAM is a private anonymous mapping of its own, so lowering the capacity (`limit`) hands
the pages of the slots given up back to the kernel."""

from __future__ import annotations

import math
import mmap
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
        slab_shape = (2, L, slots, B, H, d)  # (k|v, L, slot, B, Hkv, d)
        self._mapping: mmap.mmap | None = None
        if capacity is not None and torch.device(device).type == "cpu":
            self._mapping, self.slab = _mapped(slab_shape, dtype)
        else:
            self.slab = torch.empty(slab_shape, dtype=dtype, device=device)
        # Per layer, as tensors (a lookup is one gather, whatever the number of blocks): the
        # slot of every block number (-1: not in RAM), the block in every slot (-1: free)
        # and when every slot was last read (a tick: the least recent leave first). Slots
        # [0, used) have been written.
        self._slot_of = torch.full((L, 0), -1, dtype=torch.long)
        self._block_in = torch.full((L, slots), -1, dtype=torch.long)
        self._read_at = torch.zeros(L, slots, dtype=torch.long)
        self._tick = 0
        self._used = [0] * L
        self.fetched = 0  # blocks' layers read back from the store

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (the slab beyond them is not touched yet)."""
        return sum(self._used) * self.block_bytes // self.shape[0]  # a layer's k and v per slot

    @property
    def block_bytes(self) -> int:
        return block_bytes(self.shape, self.slab.dtype)

    def limit(self, capacity: int) -> None:
        """Hold at most `capacity` blocks per layer from now on (at most the capacity given at
        construction): blocks in the slots beyond it leave RAM (the store keeps them), and in
        host RAM those slots' pages go back to the kernel."""
        if self.capacity is None or capacity < 1:
            raise ValueError(f"a bounded cache's capacity can be lowered to >= 1 blocks, got {capacity}")
        if capacity >= self.capacity:
            return
        for layer in range(self.shape[0]):
            gone = self._block_in[layer, capacity:]
            self._slot_of[layer, gone[gone >= 0]] = -1
            gone.fill_(-1)
            self._used[layer] = min(self._used[layer], capacity)
        if self._mapping is not None:
            self._release(capacity, self.capacity)
        self.capacity = capacity

    def _release(self, start: int, stop: int) -> None:
        """Give the pages of slots [start, stop) of every (k|v, layer) back to the kernel
        (the whole pages inside the range: they read as zeros until written again)."""
        assert self._mapping is not None
        slot_bytes = self.block_bytes // (2 * self.shape[0])
        slots = self.slab.shape[2]
        for row in range(2 * self.shape[0]):  # (k|v, layer) pairs, in the slab's order
            first = (row * slots + start) * slot_bytes
            last = (row * slots + stop) * slot_bytes
            first = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE
            last = last // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                self._mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def held(self, layer: int) -> int:
        """Blocks `layer` holds."""
        return int((self._block_in[layer] >= 0).sum())

    def put(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Newly evicted blocks with their payloads kv (2, L, n, B, Hkv, d), into every layer."""
        keep = blocks if self.capacity is None else blocks[-self.capacity :]
        if not keep:
            return
        new = torch.tensor(keep, dtype=torch.long)
        self._grow_map(max(keep) + 1)
        for layer in range(self.shape[0]):
            slots = self._take(layer, len(keep), protected=torch.empty(0, dtype=torch.long))
            self._assign(layer, new, slots)
            self.slab[:, layer, slots] = kv[:, layer, len(blocks) - len(keep) :].to(self.slab)

    def slots(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Slots (blocks' shape) holding `layer` of `blocks` (block numbers on the host,
        repeats allowed), reading the missing ones from the store in one call."""
        self._grow_map(int(blocks.max()) + 1 if blocks.numel() else 0)
        slot = self._slot_of[layer][blocks]
        absent = slot < 0
        if bool(absent.any()):
            needed = blocks.unique()
            if self.capacity is not None and needed.numel() > self.capacity:
                raise ValueError(f"{needed.numel()} blocks needed at once, the cache holds {self.capacity}")
            missing = blocks[absent].unique()
            if self._fetch is None:
                raise KeyError(f"blocks {missing[:5].tolist()} are not in memory")
            kv = self._fetch(layer, missing.tolist())
            self.fetched += missing.numel()
            held = self._slot_of[layer][needed]
            fresh = self._take(layer, missing.numel(), protected=held[held >= 0])
            self._assign(layer, missing, fresh)
            self.slab[:, layer, fresh] = kv.to(self.slab)
            slot = self._slot_of[layer][blocks]
        self._tick += 1
        self._read_at[layer, slot] = self._tick
        return slot

    def _grow_map(self, blocks: int) -> None:
        """Room in the block -> slot map for block numbers below `blocks` (doubling)."""
        have = self._slot_of.shape[1]
        if blocks > have:
            grown = torch.full((self.shape[0], max(blocks, 2 * have)), -1, dtype=torch.long)
            grown[:, :have] = self._slot_of
            self._slot_of = grown

    def _assign(self, layer: int, blocks: torch.Tensor, slots: torch.Tensor) -> None:
        """Record that `slots` now hold `blocks` (read now)."""
        self._tick += 1
        self._slot_of[layer, blocks] = slots
        self._block_in[layer, slots] = blocks
        self._read_at[layer, slots] = self._tick

    def _take(self, layer: int, n: int, protected: torch.Tensor) -> torch.Tensor:
        """n free slots of `layer`: never used ones (up to the capacity), then those of the
        least recently read blocks (never a protected slot's), which leave RAM."""
        used = self._used[layer]
        fresh = n if self.capacity is None else min(n, self.capacity - used)
        have = self.slab.shape[2]
        if used + fresh > have:  # unbounded: grow by doubling
            size = max(used + fresh, 2 * have)
            slab = self.slab.new_empty(*self.slab.shape[:2], size, *self.slab.shape[3:])
            slab[:, :, :have] = self.slab
            self.slab = slab
            self._block_in = torch.cat(
                [self._block_in, self._block_in.new_full((self.shape[0], size - have), -1)], 1
            )
            self._read_at = torch.cat([self._read_at, self._read_at.new_zeros(self.shape[0], size - have)], 1)
        self._used[layer] += fresh
        taken = torch.arange(used, used + fresh)
        if n == fresh:
            return taken
        # Oldest read first; among slots read at once, the lowest first (deterministic).
        age = self._read_at[layer, :used].clone()
        age[protected] = torch.iinfo(torch.long).max
        victims = age.argsort(stable=True)[: n - fresh]
        self._slot_of[layer, self._block_in[layer, victims]] = -1
        return torch.cat([taken, victims])

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer`: (slots * B * Hkv, d) views, row (slot * B + offset) * Hkv + h."""
        d = self.shape[-1]
        return self.slab[0, layer].view(-1, d), self.slab[1, layer].view(-1, d)


def block_bytes(shape: tuple[int, int, int, int], dtype: torch.dtype) -> int:
    """Bytes one block of shape (L, B, Hkv, d) per k and v takes: keys and values of every layer."""
    return 2 * math.prod(shape) * dtype.itemsize


def _mapped(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[mmap.mmap, torch.Tensor]:
    """A tensor over a private anonymous mapping of its own (pages given on first touch)."""
    nbytes = math.prod(shape) * dtype.itemsize
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
    return mapping, tensor
