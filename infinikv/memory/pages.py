"""Paged KV cache: a fixed pool of pages shared by all sequences, one block table each.

Keys are stored before RoPE (see `infinikv.model.rope`). Page 0 is a reserved null page
that is never handed out, so a padded block table can point at it safely (vLLM's
convention). Free pages are kept in a queue: freed pages go to the back and allocation
takes from the front, so a page that was just released is the last to be reused.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from infinikv.errors import CacheFullError

NULL_PAGE = 0


class PagePool:
    """KV storage for every layer: `k`, `v` are (L, P, B, Hkv, d), B tokens per page."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fill_value: float | None = None,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        # torch.empty leaves memory untouched, so RSS grows only with pages actually written.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.page_size = page_size
        # Tests set fill_value=NaN: a read of a slot that was never written poisons the output.
        self.fill_value = fill_value
        self._free: deque[int] = deque(range(1, num_pages))

    @classmethod
    def for_tokens(cls, max_tokens: int, page_size: int, **kwargs: object) -> PagePool:
        """A pool that holds `max_tokens` tokens (plus the null page)."""
        return cls(num_pages=math.ceil(max_tokens / page_size) + 1, page_size=page_size, **kwargs)  # type: ignore[arg-type]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache full: need {n} more pages of {self.page_size} tokens, "
                f"{len(self._free)} free of {self.num_pages - 1}"
            )
        pages = [self._free.popleft() for _ in range(n)]
        if self.fill_value is not None:
            self.k[:, pages] = self.fill_value
            self.v[:, pages] = self.fill_value
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)


class BlockTable:
    """One sequence's pages, in token order, and how many tokens are written."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []
        self.length = 0
        self._pages_tensor: torch.Tensor | None = None

    def reserve(self, n: int) -> torch.Tensor:
        """Make room for n new tokens; return their cache slots (n,) = page * B + offset."""
        B = self.pool.page_size
        need = math.ceil((self.length + n) / B) - len(self.pages)
        if need > 0:
            self.pages += self.pool.allocate(need)
            self._pages_tensor = None
        positions = torch.arange(self.length, self.length + n)
        pages = torch.tensor(self.pages, dtype=torch.long)[positions // B]
        self.length += n
        return (pages * B + positions % B).to(self.pool.k.device)

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on (e.g. rejected draft tokens); free unused pages."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        keep = math.ceil(length / self.pool.page_size)
        if keep < len(self.pages):
            self.pool.free(self.pages[keep:])
            del self.pages[keep:]
            self._pages_tensor = None
        self.length = length

    def release(self) -> None:
        self.truncate(0)

    def pages_tensor(self) -> torch.Tensor:
        """The page ids (n_pages,) long, on the pool's device (cached until pages change)."""
        if self._pages_tensor is None:
            self._pages_tensor = torch.tensor(self.pages, dtype=torch.long, device=self.pool.k.device)
        return self._pages_tensor
