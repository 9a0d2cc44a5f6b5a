"""One sequence's cache state and the forward batches that extend it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from infinikv.attention.long_context import LongContextState
from infinikv.engine.long_context import LongContextConfig
from infinikv.memory.pages import BlockTable, PagePool
from infinikv.memory.store import BlockStore
from infinikv.model.config import ModelConfig
from infinikv.model.llama import ForwardBatch, LlamaModel, SequenceSlice

ProgressFn = Callable[[int, int], None]  # (tokens done, tokens total)


class Sequence:
    """Token history of one sequence and its block table in a shared page pool.

    With a long-context config, the oldest blocks past `resident` tokens leave the pages
    after every forward (`evict_overflow`), into the sequence's memory if it has one.
    """

    def __init__(
        self,
        pool: PagePool,
        long_context: LongContextConfig | None = None,
        model: ModelConfig | None = None,
        store: BlockStore | None = None,
        prefix: str = "",
    ):
        self.pool = pool
        self.table = BlockTable(pool)
        self.tokens: list[int] = []
        self.long_config = long_context
        self.long_state: LongContextState | None = None
        if long_context is not None:
            if model is None:
                raise ValueError("a long-context sequence needs the model config")
            self.long_state = long_context.new_state(model, pool.page_size, store, prefix)

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
            seqs=(SequenceSlice(0, n, self.table.page_list(), self.table.resident, self.long_state),),
            logits_rows=None if all_logits else torch.tensor([n - 1], device=device),
        )

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on, in the history and the cache."""
        self.table.truncate(length)
        del self.tokens[length:]

    def release(self) -> None:
        """Free the pages and forget the memory, in the block store too."""
        self.table.release()
        self.tokens.clear()
        if self.long_state is not None and self.long_state.memory is not None:
            self.long_state.memory.delete()

    def evict_overflow(self) -> None:
        """Move whole blocks beyond the resident budget (oldest first, never sinks) to memory.

        Every token in the cache is committed when this runs (after a forward, before any
        speculative tokens are written), so any full block may go.
        """
        cfg, state = self.long_config, self.long_state
        if cfg is None or state is None:
            return
        B = self.pool.page_size
        over = self.table.resident - cfg.resident
        if over < B:
            return
        victims = self.table.evict_oldest(over // B, protected=cfg.sinks // B)
        pages = [page for _, page in victims]
        if state.memory is not None:
            idx = torch.tensor(pages, device=self.pool.k.device)
            state.memory.add_blocks([block for block, _ in victims], self.pool.k[:, idx], self.pool.v[:, idx])
        self.pool.free(pages)


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
        seq.evict_overflow()
        if progress is not None:
            progress(start + len(chunk), len(tokens))
    return torch.cat(outs) if all_logits else outs[-1]
