"""Which drafted tokens the target accepts, and the token it adds after them.

Greedy: the longest prefix equal to the target's argmax, then the target's argmax: output
identical to plain greedy decoding. Sampling: speculative rejection sampling (Leviathan et
al. 2023; Chen et al. 2023): draft token x is kept with probability min(1, p(x)/q(x)); on the
first rejection the replacement is drawn from max(0, p - q) renormalized; if all are kept, one
more token is drawn from p. The output then follows the target distribution p exactly.

Both take the target's logits for the first r tokens of [last, d_0, ..., d_{k-1}] (row i is
the target's prediction after token i, which judges draft d_i), and may be called again with
more rows: drafts before `first` were decided already. They return (accepted drafts, next
token), next None when every judged draft was accepted and more rows are needed.
"""

from __future__ import annotations

import torch

from infinikv.engine.sampling import SamplingParams, target_probs


def _outcome(n: int, rows: int, k: int, pick) -> tuple[int, int | None]:  # noqa: ANN001
    if n < min(rows, k) or (n == k and rows > k):
        return n, pick(n)  # the first rejected draft's replacement, or the bonus token
    return n, None


def accept_greedy(logits: torch.Tensor, draft: list[int], first: int = 0) -> tuple[int, int | None]:
    best = logits.argmax(dim=-1).tolist()
    rows, k = len(best), len(draft)
    n = first
    while n < min(rows, k) and draft[n] == best[n]:
        n += 1
    return _outcome(n, rows, k, lambda i: best[i])


def accept_sampled(
    logits: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
    first: int = 0,
) -> tuple[int, int | None]:
    """draft_probs (k, V): the distribution each draft was drawn from; None for a
    deterministic drafter (a point mass on the drafted token)."""
    p = target_probs(logits, params).cpu()  # (rows, V)
    rows, k = p.shape[0], len(draft)
    n = first
    while n < min(rows, k):
        x = draft[n]
        q_x = 1.0 if draft_probs is None else float(draft_probs[n, x])
        u = float(torch.rand((), generator=generator))
        if not (q_x > 0 and u * q_x < float(p[n, x])):  # kept iff u < p(x) / q(x)
            break
        n += 1

    def pick(i: int) -> int:
        if i == k:
            return int(torch.multinomial(p[i], 1, generator=generator))
        if draft_probs is None:
            residual = p[i].clone()
            residual[draft[i]] = 0.0
        else:
            residual = (p[i] - draft_probs[i].cpu()).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # p == q: the rejection had probability zero
            residual = p[i]
        return int(torch.multinomial(residual, 1, generator=generator))

    return _outcome(n, rows, k, pick)
