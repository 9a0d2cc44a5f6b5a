"""Whole lines of a token history: a passage that a re-read shows the model, or a citation
shows a reader, starts after a line break and ends with one where one is near."""

from __future__ import annotations

from typing import Any

# A passage grows to whole lines when its line ends this close: a fact cut mid-line (a
# uuid's last digits) is answered and cited cut (docs/recall.md).
LINE_REACH = 64


def line_breaks(tokenizer: Any) -> frozenset[int]:
    """The token ids whose text holds a line break."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts) if "\n" in text)


def whole_lines(
    history: list[int], a: int, b: int, lo: int, hi: int, breaks: frozenset[int], reach: int = LINE_REACH
) -> tuple[int, int]:
    """[a, b) grown to start after a line break (or at `lo`, where the text starts) and to
    end with one, each side only if that break is within `reach` tokens and [lo, hi)."""
    first, last = max(lo, a - reach), min(hi, b + reach)
    start = next((i for i in range(a, first - 1, -1) if i == lo or history[i - 1] in breaks), a)
    stop = next((i for i in range(b, last + 1) if history[i - 1] in breaks), b)
    return start, stop
