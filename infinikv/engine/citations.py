"""The passages an answer drew on: the stretches of the documents (or the prompt) that its
answering positions attended to most (attention/tally.py), as character offsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from infinikv.attention.tally import top_windows
from infinikv.engine.lines import whole_lines
from infinikv.engine.session import DocumentSpan

# The attention of windows of this many tokens picks the passages (a line or two of prose);
# each is cited with half as many tokens of context on either side, then as whole lines.
PASSAGE_TOKENS = 32
# Passages an answer returns at most, by attention share.
CITED = 3


@dataclass(frozen=True)
class Citation:
    name: str  # the document's (or "prompt")
    document_id: str | None  # None for the prompt of a stateless request
    char_start: int  # the passage is text[char_start:char_end] of the document
    char_end: int
    section: str | None  # "chapter: title" or "page: label", where the document has them
    share: float  # of the answer's attention (every layer and head), on this passage
    text: str


def cite(
    shares: torch.Tensor,
    history: list[int],
    sources: list[DocumentSpan],
    tokenizer: Any,
    breaks: frozenset[int],
    top: int = CITED,
) -> list[Citation]:
    """The `top` passages of `sources` (token spans of `history`) with the most attention
    `shares` (by absolute position), best first, grown to whole lines (`breaks`: the tokens
    that end one); `share` is the window's."""
    masses = []
    for source in sources:
        mass = torch.zeros(source.end - source.start, dtype=torch.float64)
        got = shares[source.start : source.end]
        mass[: got.shape[0]] = got
        masses.append(mass)
    cited = []
    for share, i, first in top_windows(masses, PASSAGE_TOKENS, top):
        source, margin = sources[i], PASSAGE_TOKENS // 2
        a = source.start + max(0, first - margin)
        b = min(source.start + first + PASSAGE_TOKENS + margin, source.end)
        a, b = whole_lines(history, a, b, source.start, source.end, breaks)
        cited.append(_citation(share, source, a - source.start, b - source.start, history, tokenizer))
    return cited


def _citation(
    share: float, source: DocumentSpan, first: int, last: int, history: list[int], tokenizer: Any
) -> Citation:
    ids = history[source.start : source.end]
    # Decoding a prefix of a text's byte-level tokens gives that prefix of the text.
    start, end = (len(tokenizer.decode(ids[:t], skip_special_tokens=True)) for t in (first, last))
    at = source.start + first
    section = next((s for s in source.sections if s.start <= at < s.end), None)
    return Citation(
        source.name,
        source.id or None,
        start,
        end,
        None if section is None else f"{section.kind}: {section.title}",
        round(share, 4),
        tokenizer.decode(ids[first:last], skip_special_tokens=True),
    )
