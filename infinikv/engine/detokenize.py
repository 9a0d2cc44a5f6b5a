"""Token ids -> text deltas, holding back what might still become a stop string."""

from __future__ import annotations

from typing import Any

# A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives.
REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenizer for one generation.

    `push(token)` returns the text that became final. Text that could be the beginning
    of a stop string is held back until it is disambiguated; when a stop string appears,
    the text before it is returned and `stopped` turns True.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False
        # self.text holds ids[:read]; new ids are decoded after ids[prefix:read], the
        # previous push's, as context (a tokenizer may decode a token's leading space only
        # after another token), so a push costs a few tokens' decoding, not the whole text's.
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        window = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if window.endswith(REPLACEMENT):
            return ""
        known = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        self.text += window[len(known) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end of generation: everything not yet returned (no stop string matched)."""
        if self.stopped:
            return ""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _release(self) -> str:
        if self.stopped:
            return ""
        # A stop string may end anywhere in the new text, so search from the earliest
        # character it could start at.
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.emitted - longest + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            end = max(min(hits), self.emitted)
            self.stopped = True
        else:
            end = len(self.text) - self._partial_stop_len()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
