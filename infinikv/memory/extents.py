"""Space management for a file of variable-length values: where the next value goes, and
what a deleted one gives back. Free runs are kept sorted by offset with neighbours merged;
a value takes the smallest run it fits (best fit: blocks of one model all have one size,
so a freed block's run is reused exactly), else the file's end grows. A run freed at the
end shrinks the file instead."""

from __future__ import annotations

import bisect


class Extents:
    def __init__(self) -> None:
        self.end = 0  # bytes in use up to here (the file's length)
        self._starts: list[int] = []  # free runs, sorted by offset
        self._lengths: list[int] = []

    def take(self, n: int) -> int:
        """The offset of n bytes of free space, now in use."""
        fits = [(length, i) for i, length in enumerate(self._lengths) if length >= n]
        if not fits:
            self.end += n
            return self.end - n
        length, i = min(fits)
        start = self._starts[i]
        if length == n:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += n
            self._lengths[i] -= n
        return start

    def give(self, start: int, n: int) -> None:
        """Free the n bytes at start (taken before, not freed since)."""
        if n == 0:
            return
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # merge with the run before
            i -= 1
            self._lengths[i] += n
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, n)
        if i + 1 < len(self._starts) and self._starts[i] + self._lengths[i] == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            del self._starts[i + 1]
        if self._starts[-1] + self._lengths[-1] == self.end:  # the last run reaches the end
            self.end = self._starts.pop()
            self._lengths.pop()
