"""Paged KV cache: a fixed pool of pages shared by all sequences, one block table each.

Keys are stored before RoPE (`k`, see `infinikv.core.rope`): that is the canonical copy,
which later placements (Self-Extend groups, memory distance) and eviction read. Beside it,
`k_rope` holds each key rotated at its own position, written once with the key: exact-position
attention reads it directly instead of re-rotating the whole cache at every decode step
(measured: that rotation cost ~6 ms per token at 2k context on 2 CPU cores). A pool for
Self-Extend with group G > 1 also keeps `k_group`, each key rotated at its grouped position
position // G, for the same reason (the same tensor as `k_rope` when G = 1); a block table
whose sinks move rotates their rows again (`BlockTable.page_list`), so `k_group` always
matches the positions attention reads. Page 0 is a reserved null page that is never handed
out, so a padded block table can point at it safely (vLLM's convention). Allocation takes
the lowest free page ids (a min-heap) so that a sequence's pages tend to form one
contiguous run: attention then reads them as a view of the pool instead of gathering a
copy (see `PageList`). A page has a reference count: a prefix cache (`cache/prefix.py`) and
the sequences that start with the prompt prefix it holds share its full pages, and a table
copies a shared page before it would change it (copy on write).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infinikv.core.rope import RotaryEmbedding, grouped_key_positions, rotate
from infinikv.errors import CacheFullError

NULL_PAGE = 0


@dataclass(frozen=True)
class LayerKV:
    """One layer's pages: each (P, B, Hkv, d)."""

    k: torch.Tensor  # keys before RoPE
    k_rope: torch.Tensor  # keys rotated at their own positions
    v: torch.Tensor
    k_group: torch.Tensor  # keys rotated at their Self-Extend positions position // group
    group: int


class PagePool:
    """KV storage for every layer: `k`, `k_rope`, `v`, `k_group` are (L, P, B, Hkv, d), B
    tokens per page; `group` is the Self-Extend group size `k_group` is rotated for, by
    `rope` (the model's rotary table; a pool without one stores pre-rotated keys only)."""

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
        group: int = 1,
        rope: RotaryEmbedding | None = None,
    ):
        if page_size < 1 or group < 1:
            raise ValueError(f"page_size and group must be >= 1, got {page_size} and {group}")
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        # torch.empty leaves memory untouched, so RSS grows only with pages actually written.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.k_rope = torch.empty(shape, dtype=dtype, device=device)
        self.group = group
        self.k_group = self.k_rope if group == 1 else torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.rope = rope
        # Tests set fill_value=NaN: a read of a slot that was never written poisons the output.
        self.fill_value = fill_value
        self._free: list[int] = list(range(1, num_pages))  # a heap (sorted is a valid heap)
        self._refs = [0] * num_pages  # holders of each page: tables, a prefix cache
        # Set by a prefix cache: frees up to n pages that only it holds, for an allocation.
        self.reclaim: Callable[[int], None] | None = None

    @classmethod
    def for_tokens(cls, max_tokens: int, page_size: int, **kwargs: object) -> PagePool:
        """A pool that holds `max_tokens` tokens (plus the null page)."""
        return cls(num_pages=math.ceil(max_tokens / page_size) + 1, page_size=page_size, **kwargs)  # type: ignore[arg-type]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds once every page has been written (untouched ones cost none)."""
        return sum(cache.nbytes for cache in self._caches())

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free) and self.reclaim is not None:
            self.reclaim(n - len(self._free))
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache full: need {n} more pages of {self.page_size} tokens, "
                f"{len(self._free)} free of {self.num_pages - 1}"
            )
        pages = [heapq.heappop(self._free) for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
        if self.fill_value is not None:
            for cache in self._caches():
                cache[:, pages] = self.fill_value
        return pages

    def share(self, pages: list[int]) -> None:
        """One more holder for each of `pages` (held already)."""
        for page in pages:
            if self._refs[page] < 1:
                raise ValueError(f"page {page} is free: there is nothing to share")
            self._refs[page] += 1

    def holders(self, page: int) -> int:
        return self._refs[page]

    def copy(self, page: int) -> int:
        """A new page holding what `page` holds, in every layer and cache."""
        (new,) = self.allocate(1)
        for cache in self._caches():
            cache[:, new] = cache[:, page]
        return new

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.k_rope[i], self.v[i], self.k_group[i], self.group)

    def _caches(self) -> list[torch.Tensor]:
        """The distinct cache tensors (`k_group` is `k_rope` when group is 1)."""
        return [self.k, self.k_rope, self.v] + [self.k_group] * (self.k_group is not self.k_rope)

    def write(
        self,
        i: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        k_rope: torch.Tensor,
        v: torch.Tensor,
        k_group: torch.Tensor,
    ) -> None:
        """Store layer i's new tokens: slots (N,) long; k, k_rope, v, k_group (N, Hkv, d)
        (k_group is not stored when the pool keeps no separate copy: group 1), rounded to the
        pool's dtype."""
        for cache, new in zip(self._caches(), (k, k_rope, v, k_group), strict=False):
            cache[i].view(-1, *new.shape[1:]).index_copy_(0, slots, new.to(cache.dtype))

    def key_phases(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phases (N, d/2) of keys at `positions` as the pool keeps them: at their own
        positions (`k_rope`) and at their grouped ones (`k_group`; the same when group is 1)."""
        own = self._rope().at(positions)
        return own, own if self.group == 1 else self._rope().at(grouped_key_positions(positions, self.group))

    def write_keys(
        self,
        i: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        phases: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Write layer i's keys (before RoPE) and values (N, Hkv, d) at slots (N,), with the
        rotated copies the pool keeps; `phases` from `key_phases`."""
        k_rope = rotate(k, phases[0])
        self.write(i, slots, k, k_rope, v, k_rope if self.group == 1 else rotate(k, phases[1]))

    def regroup(self, pages: list[int], positions: torch.Tensor) -> None:
        """Rotate the `k_group` rows of `pages` (every layer) again from their pre-RoPE keys,
        at the grouped places of their slots' new `positions` (len(pages) * B,): a block
        table moved them (`BlockTable.page_list`)."""
        if not pages:
            return
        idx = torch.tensor(pages, dtype=torch.long, device=self.k.device)
        phases = self._rope().at(grouped_key_positions(positions, self.group))
        self.k_group[:, idx] = rotate(self.k[:, idx], phases.view(len(pages), self.page_size, -1))

    def _rope(self) -> RotaryEmbedding:
        if self.rope is None:
            raise ValueError("this page pool has no rotary table: it cannot rotate keys itself")
        return self.rope

    def free(self, pages: list[int]) -> None:
        """One holder fewer for each of `pages`; a page no one holds is free again."""
        for page in pages:
            if self._refs[page] < 1:
                raise ValueError(f"page {page} is freed twice")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                heapq.heappush(self._free, page)


@dataclass(frozen=True)
class PageList:
    """A block table as the attention reads it."""

    ids: torch.Tensor  # (n_pages,) long, on the pool's device
    first: int | None  # when not None, ids == first, first + 1, ... (one contiguous run)
    positions: torch.Tensor  # (n_pages * B,) long: the position attention gives every slot
    end: int  # one past the last slot's position, known on the host (no device read)
    sinks: int = 0  # leading slots whose positions were moved (`of`'s sink_gap), 0: none
    shift: int = 0  # how far they moved

    @classmethod
    def of(
        cls, pages: list[int], blocks: list[int], page_size: int, device: torch.device, sink_gap: int = 0
    ) -> PageList:
        """Slot positions are block * B + offset, except, with `sink_gap` >= 1, the sinks'
        (the blocks before the first jump in block numbers, which eviction leaves after
        them) once enough blocks between them and the rest are gone: they move up to end
        `sink_gap` positions before the next resident token, as StreamingLLM (Xiao et al.
        2024) places its sinks beside the window it keeps. Left at their own positions, a
        model trained to L tokens would read its sinks ever farther back; at 32k tokens
        SmolLM2 (L = 8k) lost a passkey encoded 23k to 27k tokens in (docs/notes/long_context.md,
        "What failed at 32k") and found it with the sinks moved."""
        run = bool(pages) and pages[-1] - pages[0] == len(pages) - 1 and pages == sorted(pages)
        ids = torch.tensor(pages, dtype=torch.long, device=device)
        starts = [b * page_size for b in blocks]
        jump = next((i for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1] + 1), 0)
        shift = starts[jump] - sink_gap - (starts[jump - 1] + page_size - 1) if sink_gap and jump else 0
        sinks = jump * page_size if shift > 0 else 0
        starts[: sinks // page_size] = [s + shift for s in starts[: sinks // page_size]]
        offsets = torch.arange(page_size, device=device)
        positions = (torch.tensor(starts, dtype=torch.long, device=device)[:, None] + offsets).flatten()
        end = (blocks[-1] + 1) * page_size if blocks else 0
        return cls(ids, pages[0] if run else None, positions, end, sinks, shift if sinks else 0)

    def gather(self, cache: torch.Tensor, stop: int, start: int = 0) -> torch.Tensor:
        """Resident tokens [start, stop) in page order: cache (P, B, H, d) -> (stop - start, H, d).

        A contiguous run is a view of the pool (no copy); otherwise only the pages that hold
        those tokens are gathered.
        """
        B = cache.shape[1]
        first, last = start // B, -(-stop // B)  # the pages holding [start, stop)
        if self.first is not None:
            pages = cache[self.first + first : self.first + last]  # (n, B, H, d) view
        else:
            pages = cache.index_select(0, self.ids[first:last])  # (n, B, H, d) copy
        return pages.flatten(0, 1)[start - first * B : stop - first * B]


class BlockTable:
    """One sequence's resident pages and the block (position // B) each one holds.

    Blocks are evicted oldest first, after the protected sink blocks, so the resident
    blocks are the sinks followed by one run of the most recent blocks. When the sinks
    move (PageList.of), the table rotates their `k_group` rows again (`PagePool.regroup`):
    the pool's rotated copies always match the positions attention reads.
    """

    def __init__(self, pool: PagePool, sink_gap: int = 0):
        self.pool = pool
        self.sink_gap = sink_gap  # see PageList.of: a long-context sequence's window W
        self.pages: list[int] = []
        self.blocks: list[int] = []
        self.length = 0  # tokens written, evicted ones included
        self.evicted_blocks = 0
        self.evicted_until = 0  # tokens before this position may be evicted: never truncated
        self._page_list: PageList | None = None
        self._sinks_placed = (0, 0)  # (sinks, shift) of the PageList that k_group matches

    @property
    def resident(self) -> int:
        """Tokens in the pages (all but the evicted ones)."""
        return self.length - self.evicted_blocks * self.pool.page_size

    def reserve(self, n: int) -> torch.Tensor:
        """Make room for n new tokens; return their cache slots (n,) = page * B + offset."""
        B = self.pool.page_size
        if self.length % B:
            self._own(len(self.pages) - 1)  # new tokens go into it: a copy if others read it
        last_block = math.ceil((self.length + n) / B) - 1
        have = self.blocks[-1] if self.blocks else -1
        if last_block > have:
            self.pages += self.pool.allocate(last_block - have)
            self.blocks += range(have + 1, last_block + 1)
            self._page_list = None
        positions = torch.arange(self.length, self.length + n)
        # New tokens fall in the trailing blocks, which sit at the end of the page list.
        back = last_block - positions // B  # (n,) blocks from the end
        pages = torch.tensor(self.pages, dtype=torch.long)[len(self.pages) - 1 - back]
        self.length += n
        return (pages * B + positions % B).to(self.pool.k.device)

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on (e.g. rejected draft tokens); free unused pages."""
        if not self.evicted_until <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        keep_blocks = math.ceil(length / self.pool.page_size)
        cut = next((i for i, b in enumerate(self.blocks) if b >= keep_blocks), len(self.blocks))
        if cut < len(self.pages):
            self.pool.free(self.pages[cut:])
            del self.pages[cut:], self.blocks[cut:]
            self._page_list = None
        self.length = length

    def evict_oldest(self, count: int, protected: int) -> list[tuple[int, int]]:
        """Take the `count` oldest blocks after the first `protected` (sinks) out of the table.

        Returns their (block, page) pairs; the caller copies the data out, then frees the pages.
        """
        victims = list(
            zip(
                self.blocks[protected : protected + count],
                self.pages[protected : protected + count],
                strict=True,
            )
        )
        del self.blocks[protected : protected + count], self.pages[protected : protected + count]
        self.evicted_blocks += len(victims)
        if victims:
            self.evicted_until = (victims[-1][0] + 1) * self.pool.page_size
        self._page_list = None
        return victims

    def adopt(self, blocks: list[int], length: int, evicted_blocks: int, evicted_until: int) -> list[int]:
        """Take pages for a saved table's resident `blocks` (an empty table only); returns them
        so the caller can fill them."""
        if self.pages:
            raise ValueError("adopt needs an empty block table")
        self.pages = self.pool.allocate(len(blocks))
        self.blocks = list(blocks)
        self.length, self.evicted_blocks, self.evicted_until = length, evicted_blocks, evicted_until
        self._page_list = None
        return self.pages

    def attach(self, pages: list[int]) -> None:
        """Start an empty table with `pages`, full ones that another holder keeps too (a
        prefix cache's): blocks 0, 1, ... ."""
        if self.pages:
            raise ValueError("attach needs an empty block table")
        self.pool.share(pages)
        self.pages, self.blocks = list(pages), list(range(len(pages)))
        self.length = len(pages) * self.pool.page_size
        self._page_list = None

    def _own(self, i: int) -> None:
        """Make the table's i-th page its own: a copy, when others hold it too."""
        page = self.pages[i]
        if self.pool.holders(page) > 1:
            self.pages[i] = self.pool.copy(page)
            self.pool.free([page])
            self._page_list = None

    def release(self) -> None:
        self.pool.free(self.pages)
        self.pages, self.blocks = [], []
        self.length = self.evicted_blocks = self.evicted_until = 0
        self._page_list = None
        self._sinks_placed = (0, 0)

    def page_list(self) -> PageList:
        """The pages as attention reads them (cached until the pages change). When the sinks
        moved since the last call (or moved back: a truncation to the sinks alone), their
        `k_group` rows are rotated again for their new positions, once per move."""
        if self._page_list is None:
            B = self.pool.page_size
            pages = PageList.of(self.pages, self.blocks, B, self.pool.k.device, self.sink_gap)
            if (pages.sinks, pages.shift) != self._sinks_placed:
                moved = max(pages.sinks, self._sinks_placed[0]) // B
                if any(self.pool.holders(p) > 1 for p in self.pages[:moved]):
                    for i in range(moved):  # regroup rewrites them: copies of shared ones
                        self._own(i)
                    pages = PageList.of(self.pages, self.blocks, B, self.pool.k.device, self.sink_gap)
                self.pool.regroup(self.pages[:moved], pages.positions[: moved * B])
                self._sinks_placed = (pages.sinks, pages.shift)
            self._page_list = pages
        return self._page_list
