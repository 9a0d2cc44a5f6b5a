"""Full KV pages of prompt prefixes, kept for the next prompt that starts with the same tokens
(vLLM's automatic prefix caching, SGLang's radix cache).

A page is found by its tokens and the entry of the page before it, so a hit is an exact
match of every token from position 0: two prompts share a page only if they agree on all
tokens up to its end. What a page holds must also not depend on how it was computed:
`kind` names the computation (the engine's prompt pieces, or its chunks of a given size),
and a prompt only attaches pages computed the way it would compute them itself, so its
output is the same, bit for bit, with the cache or without it. Entries are dropped least
recently used first when the pool needs their pages; a lookup touches a prefix's entries
from its last page back, so a page's parent is never dropped before it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from infinikv.cache.pages import PagePool

Key = tuple[int, Hashable, tuple[int, ...]]  # (parent entry id, kind, the page's tokens)


@dataclass(frozen=True)
class _Entry:
    id: int
    page: int


class PrefixCache:
    """The pool's cached prefix pages: each entry holds one reference to its page, so the
    page outlives the sequence that computed it until the pool reclaims it."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count(1)
        self.hit_tokens = 0  # prompt tokens attached instead of computed, since the start
        pool.reclaim = self.reclaim

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: list[int], kind: Hashable, most: int, unit: int = 1) -> list[int]:
        """The pages of the longest cached prefix of `tokens` computed as `kind`: at most
        `most` pages, a multiple of `unit`. The caller attaches them (BlockTable.attach)
        before anything else allocates."""
        B = self.pool.page_size
        keys, pages, parent = [], [], 0
        for start in range(0, min(most, len(tokens) // B) * B, B):
            key = (parent, kind, tuple(tokens[start : start + B]))
            entry = self._entries.get(key)
            if entry is None:
                break
            keys.append(key)
            pages.append(entry.page)
            parent = entry.id
        self._touch(keys)
        pages = pages[: len(pages) // unit * unit]
        self.hit_tokens += len(pages) * B
        return pages

    def insert(self, tokens: list[int], pages: list[int], kind: Hashable) -> None:
        """Keep `pages` (pages[i] holds tokens[i * B : (i + 1) * B], computed as `kind`),
        those not cached yet; a page whose prefix is cached already is not kept twice."""
        B = self.pool.page_size
        keys, parent = [], 0
        for i, page in enumerate(pages[: len(tokens) // B]):
            key = (parent, kind, tuple(tokens[i * B : (i + 1) * B]))
            entry = self._entries.get(key)
            if entry is None:
                self.pool.share([page])
                entry = self._entries[key] = _Entry(next(self._ids), page)
            keys.append(key)
            parent = entry.id
        self._touch(keys)

    def _touch(self, keys: list[Key]) -> None:
        for key in reversed(keys):  # the first page most recent: it is dropped last
            self._entries.move_to_end(key)

    def reclaim(self, n: int) -> None:
        """Drop least recently used entries whose page no sequence holds until `n` pages
        are free again (or none is left to drop)."""
        for key in list(self._entries):
            if n <= 0:
                return
            entry = self._entries[key]
            if self.pool.holders(entry.page) == 1:
                del self._entries[key]
                self.pool.free([entry.page])
                n -= 1
