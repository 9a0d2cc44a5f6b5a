"""The drafter interface: propose up to k tokens after a sequence, cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import Sequence


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    # (len(tokens), V): the distribution each token was drawn from; None when the drafter
    # is deterministic (a point mass on each token), e.g. lookup or a greedy draft.
    probs: torch.Tensor | None = None
    # Seconds of this proposal spent on setup that is not a cost per drafted token (a draft
    # model's prefill of its window after a restart); the cost model leaves them out.
    setup_s: float = 0.0


class Drafter(Protocol):
    name: str

    def propose(
        self, seq: Sequence, last: int, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        """Up to k tokens to follow seq.tokens + [last] (`last` is sampled, not yet fed),
        sampled with `generator` when params are not greedy. The drafter may write into
        `seq` while drafting but leaves it as it found it."""
        ...

    def release(self) -> None:
        """Free what the drafter holds for this generation."""
        ...
