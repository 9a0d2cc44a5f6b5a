"""Answering past the resident window by re-reading: the answer is generated over a short
prompt of the history's head, the passages the question attended to most, and its tail.

After a long prompt's prefill, the attention of its last position (attention/tally.py,
every key scored at the memory distance: resident ones from their keys before RoPE,
evicted ones by the key sketch) puts the planted fact's window first in most cases, while
the model answering over 8k resident tokens of other text loses it; over ~2k tokens it
reads it back (after InfiniRetri, which answers from the tokens the question's attention
picks). docs/recall.md has the tuning and the held-out results."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinikv.attention.tally import AttentionTally, top_windows
from infinikv.engine.lines import LINE_REACH, whole_lines

# Passages are picked as windows of this many tokens (a line or two of prose).
WINDOW_TOKENS = 32
# The first third of the layers does not vote: there SmolLM2's last position attends by
# place and syntax; from a third of the depth on, to the fact asked for (docs/recall.md).
VOTING_FROM = 1 / 3
# Between the pieces of a re-read prompt: marks the text left out.
SEPARATOR = "\n...\n"
# The passages' order: by position; by attention, the most attended next to the question; by
# position with the most attended moved next to the question, or also repeated there.
ORDERS = ("position", "best-last", "top-last", "top-twice")


@dataclass(frozen=True)
class Reread:
    passages: int  # windows taken, by attention
    margin: int  # tokens kept on either side of each window
    head: int  # first tokens of the history kept (the sinks: BOS, a system prompt)
    tail: int  # last tokens kept (the question)
    reach: int = LINE_REACH  # tokens a passage may grow either way to whole lines
    order: str = "position"  # one of ORDERS
    floor: float = 0.0  # windows holding less than this share of the best one's are left out

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r}: one of {', '.join(ORDERS)}")

    @staticmethod
    def tally(num_layers: int) -> AttentionTally:
        """The tally a re-read ranks passages by: every key at the memory distance, the
        deeper layers only."""
        return AttentionTally(uniform=True, first_layer=int(num_layers * VOTING_FROM))

    def spans(
        self, shares: torch.Tensor, history: list[int], breaks: frozenset[int]
    ) -> list[tuple[int, int]]:
        """The token spans [start, end) of `history` that a prompt re-reads between its head
        and tail, in order: the `passages` windows with the most attention `shares` (by
        absolute position), each widened by `margin`, then to whole lines (`breaks`: the
        tokens that end one), overlaps joined; in `order`."""
        end = len(history) - self.tail
        if end <= self.head:
            return []
        mass = torch.zeros(end - self.head, dtype=torch.float64)
        got = shares[self.head : end]
        mass[: got.shape[0]] = got
        widened = []
        picked = top_windows([mass], WINDOW_TOKENS, self.passages)
        for share, _, first in (p for p in picked if p[0] >= self.floor * picked[0][0]):
            a = self.head + max(0, first - self.margin)
            b = min(end, self.head + first + WINDOW_TOKENS + self.margin)
            widened.append((*whole_lines(history, a, b, self.head, end, breaks, self.reach), share))
        spans: list[tuple[int, int, float]] = []
        for a, b, share in sorted(widened):
            if spans and a <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(b, spans[-1][1]), max(share, spans[-1][2]))
            else:
                spans.append((a, b, share))
        if self.order == "best-last":
            spans.sort(key=lambda span: span[2])
        elif self.order in ("top-last", "top-twice") and spans:
            top = max(spans, key=lambda span: span[2])
            rest = spans if self.order == "top-twice" else [s for s in spans if s is not top]
            spans = [*rest, top]
        return [(a, b) for a, b, _ in spans]

    def prompt(
        self, shares: torch.Tensor, history: list[int], separator: list[int], breaks: frozenset[int]
    ) -> list[int]:
        """The re-read prompt: head, each span, tail, with `separator` tokens between."""
        n = len(history)
        if n <= self.head + self.tail:
            return list(history)
        ids = history[: self.head]
        for a, b in self.spans(shares, history, breaks):
            ids += separator + history[a:b]
        return ids + separator + history[n - self.tail :]
