"""A separate, smaller draft model sharing the target's tokenizer, with a cache of its own.

The draft reads a bounded window of the most recent tokens (plain attention, positions from
the window's start): its cost per token stays flat however long the target's context is.
When the window fills, it restarts from the last half of it (one re-prefill per W/2 tokens).
"""

from __future__ import annotations

import time

import torch

from infinikv.engine.sampling import SamplingParams, target_probs
from infinikv.engine.sequence import Sequence, feed
from infinikv.engine.speculative.drafter import Draft
from infinikv.errors import InfinikvError
from infinikv.model.llama import LlamaModel
from infinikv.model.loader import LoadedModel

# 512 recent tokens: enough local context to predict the next few tokens, and cheap to
# re-prefill (256 tokens once per 256 generated; the first catch-up after a long prompt
# cost 1.7 s with a 1024-token window, a fifth of a 128-token answer's decode time).
DRAFT_WINDOW = 512
MAX_DRAFT = 16


class DraftModelDrafter:
    name = "model"

    def __init__(
        self, model: LlamaModel, window: int = DRAFT_WINDOW, page_size: int = 16, chunk_size: int = 512
    ):
        self.model, self.window, self.chunk_size = model, window, chunk_size
        self.pool = model.new_page_pool(window + MAX_DRAFT + 2 * page_size, page_size)
        self.seq = Sequence(self.pool)
        self.offset = 0  # target position of the draft sequence's first token

    def _catch_up(self, history: list[int]) -> tuple[torch.Tensor, float]:
        """Feed the draft what the target committed since last time: logits after
        history[-1], and the seconds it took when the window (re)started (a prefill of up
        to `window` tokens, once per window / 2 generated; else 0: the few tokens accepted
        since the last step are part of a draft's cost)."""
        if len(history) - self.offset > self.window:
            self.seq.release()
            self.offset = len(history) - self.window // 2
        restart = len(self.seq) == 0
        missing = history[self.offset + len(self.seq) :]
        start = time.perf_counter()
        logits = feed(self.model, self.pool, self.seq, missing, self.chunk_size)
        return logits, time.perf_counter() - start if restart else 0.0

    def propose(
        self, seq: Sequence, last: int, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        k = min(k, MAX_DRAFT)
        logits, setup_s = self._catch_up([*seq.tokens, last])
        start = len(self.seq)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        try:
            for i in range(k):
                if params.greedy:
                    token = int(logits[0].argmax())
                else:
                    p = target_probs(logits, params)[0]
                    token = int(torch.multinomial(p.cpu(), 1, generator=generator))
                    probs.append(p)
                tokens.append(token)
                if i + 1 < k:
                    logits = feed(self.model, self.pool, self.seq, [token], 1)
        finally:
            self.seq.truncate(start)
        return Draft(tokens, torch.stack(probs) if probs else None, setup_s)

    def release(self) -> None:
        self.seq.release()
        self.offset = 0


def check_same_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """A draft model must share the target's tokenizer; refuse a mismatch, saying how."""
    d, t = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if d != t:
        differ = sum(1 for tok, i in t.items() if d.get(tok) != i)
        raise InfinikvError(
            f"the draft model's vocabulary ({len(d)} tokens) differs from the target's ({len(t)} tokens, "
            f"{differ} missing or numbered differently): a draft model must share the target's tokenizer"
        )
