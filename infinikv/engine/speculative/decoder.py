"""One decode step with speculation: draft, verify in one target forward, roll back the rest.

The draft length is chosen by a cost model, and speculation switches itself off where it does
not pay. With a per-token acceptance rate a (estimated from recent steps, geometric model), a
draft of k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens per step, and a step costs
t(k) = t0 + b k: t0 a plain decode step, b the measured extra seconds per drafted token
(drafting plus the wider verification; on CPU a 7-token verification costs about two plain
steps). The decoder picks the k with the best E(k) t0 / t(k); when even that is below 1 it
decodes plainly for a back-off that doubles each time (32 .. 256 steps; 256 at once when a
drafted token costs as much as a plain step), then probes again. A drafter's setup inside a
step (`Draft.setup_s`: a draft model's first prefill of its window) is left out of b, or the
first probe would switch a draft model off for 256 steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from infinikv.engine.sampling import Sampler, SamplingParams
from infinikv.engine.sequence import Sequence, feed
from infinikv.engine.speculative.drafter import Draft, Drafter
from infinikv.engine.speculative.verify import accept_greedy, accept_sampled
from infinikv.model.llama import LlamaModel

EMA = 0.3  # weight of the newest observation (timings, acceptance)
PAUSE = 32  # plain steps when drafting does not pay (doubled each time, up to MAX_PAUSE)
MAX_PAUSE = 256
PRIOR_ACCEPTANCE = 0.6  # before any observation: worth a first short probe
PROBE = 1  # draft length of a probe (cheap when it fails)


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
        self.stats = SpeculationStats()
        self._plain_s: float | None = None  # t0: seconds of a plain decode step
        self._per_draft_s: float | None = None  # b: extra seconds per drafted token
        self._accept = PRIOR_ACCEPTANCE
        self._paused = 0
        self._pause_len = PAUSE

    def _draft_length(self) -> int:
        """The k with the best expected speed-up, or 0 when none beats plain decoding."""
        if self._paused > 0 or self._plain_s is None:
            return 0
        if self._per_draft_s is None:
            return min(PROBE, self.max_draft)
        a, t0, b = min(self._accept, 0.99), self._plain_s, self._per_draft_s
        if b >= t0:  # a drafted token costs a plain step: no acceptance rate can make it pay
            self._pause_len = MAX_PAUSE
        speedup = {k: (1 - a ** (k + 1)) / (1 - a) * t0 / (t0 + b * k) for k in range(1, self.max_draft + 1)}
        best = max(speedup, key=lambda k: speedup[k])
        if speedup[best] > 1.0:
            return best
        self._paused, self._pause_len = self._pause_len, min(MAX_PAUSE, 2 * self._pause_len)
        self._per_draft_s = None  # probe again after the pause
        self._accept = max(self._accept, PRIOR_ACCEPTANCE)
        return 0

    def step(self, seq: Sequence, last: int) -> list[int]:
        """Feed `last` and return the next tokens (at least one). Every returned token but the
        last is fed to `seq`; the last one is sampled and not fed (like a plain step)."""
        t0 = time.perf_counter()
        k = self._draft_length()
        self._paused = max(0, self._paused - 1)
        draft = self.drafter.propose(seq, last, k, self.params, self.sampler.generator) if k else None
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
        self._account(len(draft.tokens), n, time.perf_counter() - t0 - draft.setup_s)
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
            rows.append(feed(self.model, seq.pool, seq, segment, len(segment), logits="all", evict=False))
            logits = torch.cat(rows)
            gen = self.sampler.generator
            if self.params.greedy:
                n, token = accept_greedy(logits, draft.tokens, n)
            else:
                n, token = accept_sampled(logits, draft.tokens, draft.probs, self.params, gen, n)
            if token is not None:
                return n, token
            seq.evict_overflow()  # every fed token is accepted: plain decoding evicts here too

    def _account(self, drafted: int, accepted: int, seconds: float) -> None:
        s = self.stats
        s.drafted += drafted
        s.accepted += accepted
        s.target_forwards += 1
        s.emitted += accepted + 1
        # Geometric model: `accepted` successes, then one failure unless all were kept.
        trials = accepted + (accepted < drafted)
        self._accept = (1 - EMA) * self._accept + EMA * (accepted / trials if trials else 1.0)
        assert self._plain_s is not None
        self._per_draft_s = _ema(self._per_draft_s, max(0.0, seconds - self._plain_s) / drafted)

    def release(self) -> None:
        self.drafter.release()


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
