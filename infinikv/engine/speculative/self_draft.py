"""Self-drafting: the target's first N layers, then its final norm and head. No extra
weights and no extra cache: the draft's layers are the target's, so their keys/values for
the drafted tokens go into the target's own pages, where verification overwrites them."""

from __future__ import annotations

import torch

from infinikv.engine.sampling import SamplingParams, target_probs
from infinikv.engine.sequence import Sequence
from infinikv.engine.speculative.drafter import Draft
from infinikv.errors import InfinikvError
from infinikv.model.llama import LlamaModel


class SelfDrafter:
    def __init__(self, model: LlamaModel, num_layers: int):
        if not 1 <= num_layers < model.cfg.num_layers:
            raise InfinikvError(
                f"self-draft layers must be in [1, {model.cfg.num_layers - 1}] here, got {num_layers}"
            )
        self.model, self.num_layers = model, num_layers
        self.name = f"self:{num_layers}"

    def propose(
        self, seq: Sequence, last: int, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        start = len(seq)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        token = last
        try:
            for _ in range(k):
                logits = self.model(seq.extend_batch([token]), seq.pool, num_layers=self.num_layers)
                if params.greedy:
                    token = int(logits[0].argmax())
                else:
                    p = target_probs(logits, params)[0]
                    token = int(torch.multinomial(p.cpu(), 1, generator=generator))
                    probs.append(p)
                tokens.append(token)
        finally:
            seq.truncate(start)
        return Draft(tokens, torch.stack(probs) if probs else None)

    def release(self) -> None:
        pass
