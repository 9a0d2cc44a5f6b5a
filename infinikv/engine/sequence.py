"""One sequence's cache state and the forward batches that extend it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from infinikv.memory.pages import BlockTable, PagePool
from infinikv.model.llama import ForwardBatch, LlamaModel, SequenceSlice

ProgressFn = Callable[[int, int], None]  # (tokens done, tokens total)


class Sequence:
    """Token history of one sequence and its block table in a shared page pool."""

    def __init__(self, pool: PagePool):
        self.table = BlockTable(pool)
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def extend_batch(self, tokens: list[int], all_logits: bool = False) -> ForwardBatch:
        """Reserve cache slots for `tokens` and describe them as a one-sequence batch."""
        start, n = len(self.tokens), len(tokens)
        slots = self.table.reserve(n)
        self.tokens.extend(tokens)
        device = slots.device
        return ForwardBatch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            positions=torch.arange(start, start + n, device=device),
            slots=slots,
            seqs=(SequenceSlice(0, n, self.table.page_list(), self.table.length),),
            logits_rows=None if all_logits else torch.tensor([n - 1], device=device),
        )

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on, in the history and the cache."""
        self.table.truncate(length)
        del self.tokens[length:]

    def release(self) -> None:
        self.truncate(0)


def feed(
    model: LlamaModel,
    pool: PagePool,
    seq: Sequence,
    tokens: list[int],
    chunk_size: int,
    all_logits: bool = False,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Run `tokens` through the model in chunks of at most `chunk_size` (bounded activation
    memory for any length). Returns float32 logits: (len(tokens), V) if all_logits else (1, V)
    for the last token."""
    if not tokens:
        raise ValueError("no tokens to feed")
    outs = []
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start : start + chunk_size]
        outs.append(model(seq.extend_batch(chunk, all_logits), pool))
        if progress is not None:
            progress(start + len(chunk), len(tokens))
    return torch.cat(outs) if all_logits else outs[-1]
