"""Which drafted tokens the target accepts, and the token it adds after them.

Greedy: the longest prefix equal to the target's argmax, then the target's argmax: output
identical to plain greedy decoding. Sampling: speculative rejection sampling (Leviathan et
al. 2023; Chen et al. 2023): draft token x is kept with probability min(1, p(x)/q(x)); on the
first rejection the replacement is drawn from max(0, p - q) renormalized; if all are kept, one
more token is drawn from p. The output then follows the target distribution p exactly.
"""

from __future__ import annotations

import torch

from infinikv.engine.sampling import SamplingParams, target_probs


def accept_greedy(logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """logits (k + 1, V) of the target at the last token and the k drafted ones.
    Returns (accepted drafts, the token that follows them)."""
    best = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(
    logits: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Rejection sampling. draft_probs (k, V): the distribution each draft was drawn from;
    None for a deterministic drafter (a point mass on the drafted token)."""
    p = target_probs(logits, params).cpu()  # (k + 1, V)
    uniforms = torch.rand(len(draft), generator=generator).tolist()
    for i, x in enumerate(draft):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if q_x > 0 and uniforms[i] * q_x < float(p[i, x]):  # u < p/q without dividing
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i].cpu()).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # p == q: the rejection had probability zero
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
