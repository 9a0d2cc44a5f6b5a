"""Log-probabilities of tokens under the model's distribution (the raw logits, before
temperature or top-p), with the most likely alternatives: what `logprobs` and `echo` return."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP = 20  # alternatives per position, as OpenAI allows


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the `k` most likely tokens, most likely first


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """For logits (n, V) and the n tokens they predicted: each token's log-probability and
    the k most likely tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if k:
        values, ids = lp.topk(k, dim=-1)  # (n, k)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops, strict=True)]
