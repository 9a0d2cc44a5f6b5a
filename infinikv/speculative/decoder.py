"""One decode step with speculation: draft, verify in one target forward, roll back the rest.

The draft length adapts to acceptance (grown after a fully accepted draft, cut to what was
accepted otherwise), and speculation switches itself off when it does not pay: the
seconds per emitted token with drafts are compared with plain decode steps (an EMA of
each); when drafting is slower it pauses for a back-off of plain steps that doubles each
time it is found slower again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from infinikv.engine.sampling import Sampler, SamplingParams
from infinikv.engine.sequence import Sequence, feed
from infinikv.model.llama import LlamaModel
from infinikv.speculative.drafter import Draft, Drafter
from infinikv.speculative.verify import accept_greedy, accept_sampled

EMA = 0.3  # weight of the newest timing
PAUSE = 16  # plain steps after speculation was found slower (doubled each time, up to 256)


@dataclass
class SpeculationStats:
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    def view(self) -> dict[str, float | int]:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "target_forwards": self.target_forwards,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
        }


class SpeculativeDecoder:
    def __init__(
        self,
        model: LlamaModel,
        drafter: Drafter,
        sampler: Sampler,
        params: SamplingParams,
        max_draft: int = 8,
    ):
        self.model, self.drafter, self.sampler, self.params = model, drafter, sampler, params
        self.max_draft = max_draft
        self.k = min(4, max_draft)
        self.stats = SpeculationStats()
        self._plain_s: float | None = None  # seconds per token, plain steps
        self._spec_s: float | None = None  # seconds per emitted token, speculative steps
        self._paused = 0
        self._pause_len = PAUSE

    def step(self, seq: Sequence, last: int) -> list[int]:
        """Feed `last` and return the next tokens (at least one). Every returned token but the
        last is fed to `seq`; the last one is sampled and not fed (like a plain step)."""
        t0 = time.perf_counter()
        draft = None
        if self._paused > 0 or self._plain_s is None:
            self._paused = max(0, self._paused - 1)
        else:
            draft = self.drafter.propose(seq, last, self.k, self.params, self.sampler.generator)
        if draft is None or not draft.tokens:
            logits = feed(self.model, seq.pool, seq, [last], 1)
            out = [int(self.sampler(logits)[0])]
            self.stats.target_forwards += 1
            self.stats.emitted += 1
            self._plain_s = _ema(self._plain_s, time.perf_counter() - t0)
            return out
        start = len(seq)
        n, bonus = self._verify(seq, last, draft)
        seq.truncate(start + 1 + n)  # rejected drafts leave the cache before any eviction
        seq.evict_overflow()
        out = [*draft.tokens[:n], bonus]
        self._account(len(draft.tokens), n, (time.perf_counter() - t0) / len(out))
        return out

    def _verify(self, seq: Sequence, last: int, draft: Draft) -> tuple[int, int]:
        """Feed [last, *draft] and decide the drafts. The forward is split where plain decoding
        would evict, and the eviction happens only once the tokens before it are accepted, so
        every token sees the same resident blocks as in plain decoding (greedy stays exact)."""
        window = [last, *draft.tokens]
        rows: list[torch.Tensor] = []
        n = 0
        while True:
            fed = sum(r.shape[0] for r in rows)
            room = seq.tokens_before_eviction()
            segment = window[fed : fed + (len(window) if room is None else room)]
            rows.append(feed(self.model, seq.pool, seq, segment, len(segment), all_logits=True, evict=False))
            logits = torch.cat(rows)
            gen = self.sampler.generator
            if self.params.greedy:
                n, token = accept_greedy(logits, draft.tokens, n)
            else:
                n, token = accept_sampled(logits, draft.tokens, draft.probs, self.params, gen, n)
            if token is not None:
                return n, token
            seq.evict_overflow()  # every fed token is accepted: plain decoding evicts here too

    def _account(self, drafted: int, accepted: int, seconds_per_token: float) -> None:
        s = self.stats
        s.drafted += drafted
        s.accepted += accepted
        s.target_forwards += 1
        s.emitted += accepted + 1
        self.k = min(self.max_draft, self.k + 2) if accepted == drafted else max(1, accepted + 1)
        self._spec_s = _ema(self._spec_s, seconds_per_token)
        if self._plain_s is not None and self._spec_s > self._plain_s:
            self._paused, self._pause_len = self._pause_len, min(256, 2 * self._pause_len)
            self._spec_s = None
            self._plain_s = None  # re-measured after the pause

    def release(self) -> None:
        self.drafter.release()


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
