"""Lookup drafting (prompt lookup / n-gram copying): if the last n tokens occurred before in
the sequence, propose the tokens that followed them then. Document QA and long chats copy
spans from their context, and this costs no model call."""

from __future__ import annotations

import torch

from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import Sequence
from infinikv.engine.speculative.drafter import Draft

# Longest suffix matched first: a 3-token match predicts a continuation much better than
# a 1-token one, which is tried only when nothing longer matches.
MAX_NGRAM = 3
MIN_NGRAM = 2


class LookupDrafter:
    name = "lookup"

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        # n-gram -> end position (exclusive) of its latest occurrence, over tokens[:indexed]
        self._last_seen: dict[tuple[int, ...], int] = {}
        self._tokens: list[int] = []

    def _index(self, tokens: list[int]) -> None:
        """Index the n-grams that end at positions not indexed yet (incremental).

        Only n-grams ending at or before len - 1 are indexed, so the current suffix never
        matches itself."""
        if tokens[: len(self._tokens)] != self._tokens:  # the history was rewritten: start over
            self._last_seen.clear()
            self._tokens = []
        start = len(self._tokens)
        for end in range(max(start, 1), len(tokens)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n >= 0:
                    self._last_seen[tuple(tokens[end - n : end])] = end
        self._tokens = tokens[: len(tokens) - 1] if tokens else []

    def propose(
        self, seq: Sequence, last: int, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        tokens = [*seq.tokens, last]
        self._index(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            end = self._last_seen.get(tuple(tokens[-n:]))
            if end is not None:
                return Draft(tokens[end : end + k])
        return Draft([])

    def release(self) -> None:
        self._last_seen.clear()
        self._tokens = []
