"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinikv.engine.logprobs import MAX_TOP


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1 = off
    top_k: int = 0  # tokens kept; 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each generated token's log-probability and this many alternatives
    echo: bool = False  # the prompt's tokens' log-probabilities too (with logprobs)
    grammar: str | None = None  # the output stays inside it (engine/grammar.py)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit), as OpenAI's
    presence_penalty: float = 0.0  # subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # subtracted per time it was generated
    stop_token_ids: tuple[int, ...] = ()  # end the output (not shown), even with ignore_eos
    citations: bool = False  # record where the answer attends (engine/citations.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP}], got {self.logprobs}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def steers(self) -> bool:
        """The logits are changed before sampling (bias, penalties)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


def steer_(logits: torch.Tensor, params: SamplingParams, counts: dict[int, int]) -> torch.Tensor:
    """Add logit_bias and subtract the penalties of the tokens generated so far (`counts`),
    in place on logits (1, V)."""
    if params.logit_bias:
        tokens, bias = zip(*params.logit_bias, strict=True)
        logits[0, list(tokens)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if counts:
        seen = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[0, list(counts)] -= seen * params.frequency_penalty + params.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    logits: (B, V) float. The most likely token always survives.
    """
    if top_k and top_k < logits.shape[-1]:
        # Exactly k survive, ties at the k-th value included only as far as topk picks them.
        keep = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        drop = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, keep, False)
        logits = logits.masked_fill(drop, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V)
        # The first never, not even for a top_p that float32 rounds to 0 (then 0 >= 0).
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: (B, V) logits -> (B, V) probabilities."""
    logits = logits.float()
    # Shifted so the largest is 0 first, and the temperature kept a float32 number: a tiny
    # one then sends the rest to -inf instead of every logit to +-inf (softmax NaN).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)


class Sampler:
    """Draws next tokens for one request; seeded draws reproduce exactly."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,)."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        probs = target_probs(logits, self.params).cpu()  # the generator lives on the CPU
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(logits.device)
