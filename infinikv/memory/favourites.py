"""Ranking by logits between full rankings (block granularity, `sketch_every` > 1): each
layer's favourite blocks from its last full ranking over the key sketch, their keys kept in
reusable buffers, and the rule for when a layer ranks in full again."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The blocks per kv-head, per block selected, that a layer's full ranking over the key
# sketch keeps as its favourites for the steps until its next one.
FAVOURITES_PER_BLOCK = 4


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


class FavouriteSets:
    """Per layer: the favourites a position from the next forward on may use (the last
    chosen before it, then those the forward chose), and key buffers of dropped ones."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, sketch_every: int):
        if sketch_every < 1:
            raise ValueError(f"sketch_every={sketch_every} must be >= 1")
        self.sketch_every = sketch_every
        self.shape = (num_kv_heads, head_dim)
        self.page_size = page_size
        self.sets: list[list[Favourites]] = [[] for _ in range(num_layers)]
        self.spare: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        buffers = [f.buffer for sets in self.sets for f in sets] + sum(self.spare, [])
        return sum(b.numel() * b.element_size() for b in buffers)

    def full_ranking(
        self, layer: int, position: int, last: Favourites, nblocks: int, max_blocks: int
    ) -> bool:
        """Whether `layer` ranks every block at `position`: once in sketch_every positions,
        staggered across layers (a few layers per step), when the memory grew by max_blocks
        since its last favourites were chosen, and when those were chosen for another
        max_blocks (restored from a memory with other settings: too few, or no room)."""
        return (
            (position + layer) % self.sketch_every == 0
            or nblocks - last.ranked >= max_blocks
            or last.buffer.shape[1] != self.rows(max_blocks)
        )

    def rows(self, max_blocks: int) -> int:
        """Key rows of a favourites buffer: the most favourites and the blocks evicted until
        the growth rule ranks in full again (one size, so a dropped set's buffer always fits)."""
        return (FAVOURITES_PER_BLOCK + 1) * max_blocks * self.page_size

    def buffer(self, layer: int, rows: int, device: torch.device) -> torch.Tensor:
        """A key buffer (Hkv, rows, d) float32 for a new favourites set of `layer`: a
        dropped set's when one has that size, else a new one (kept for reuse)."""
        spare = self.spare[layer]
        for i, buffer in enumerate(spare):
            if buffer.shape[1] == rows:
                return spare.pop(i)
        H, d = self.shape
        return torch.empty(H, rows, d, device=device)

    def records(self) -> list:
        """Per layer, [position, blocks, ranked, covered, buffer rows] of each set (JSON)."""
        return [
            [[f.position, f.blocks.tolist(), f.ranked, f.covered, f.buffer.shape[1]] for f in sets]
            for sets in self.sets
        ]


def best_logits(queries: torch.Tensor, keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """queries (Hkv, P, m, d), keys (Hkv, n * B, d) of n blocks -> (Hkv, P, n): each block's
    best logit over its tokens and each group's m queries."""
    H, P, m, d = queries.shape
    logits = torch.bmm(queries.reshape(H, P * m, d), keys.transpose(1, 2))  # (Hkv, P * m, n * B)
    best = logits.view(H * P, m, -1).amax(1)  # over the group's queries
    return best.view(H, P, -1, page_size).amax(-1)  # over each block's tokens
