"""Where KV lives: device pages for the resident window (tier 1) and, for evicted blocks,
the external memory tiers described in DESIGN.md."""

from infinikv.memory.pages import BlockTable, LayerKV, PageList, PagePool

__all__ = ["BlockTable", "LayerKV", "PageList", "PagePool"]
