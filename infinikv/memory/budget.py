"""Host RAM for one sequence's evicted memory (block granularity with a store): the RAM tier's
blocks and the search structures (key sketch, block summaries) share one budget, which sets
the longest sequence the memory holds."""

from __future__ import annotations

from dataclasses import dataclass

from infinikv.memory.index import entry_bytes
from infinikv.memory.sketch import chunk_size, sketch_bytes


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
