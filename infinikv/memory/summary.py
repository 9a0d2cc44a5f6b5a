"""Representative keys of an evicted block, for block-granular retrieval (Quest, Tang et al.
2024): the channel-wise max and min of the block's keys. For a query q,
q⁺·max + q⁻·min >= q·k for every key k of the block (each channel's product is at most
that bound), and it is one inner product of 2d-dim vectors, [q⁺, q⁻]·[max, min], so a FAISS
inner-product index over one summary per block ranks blocks by an upper bound of their best
attention logit, with d/(2B) of the index a token index needs."""

from __future__ import annotations

import torch


def block_summary(keys: torch.Tensor) -> torch.Tensor:
    """keys (..., B, d) of blocks -> their summaries (..., 2d)."""
    return torch.cat([keys.amax(-2), keys.amin(-2)], -1)


def summary_query(q: torch.Tensor) -> torch.Tensor:
    """q (..., d) -> the (..., 2d) query whose inner product with a summary is the bound."""
    return torch.cat([q.clamp_min(0), q.clamp_max(0)], -1)
