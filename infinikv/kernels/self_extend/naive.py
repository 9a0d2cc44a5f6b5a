"""The plain-PyTorch reference for the Self-Extend kernel, on the same paged inputs."""

from __future__ import annotations

import torch

from infinikv.cache.pages import PageList
from infinikv.core.partial import Partial, merge_partials
from infinikv.core.rope import RotaryEmbedding, rotate
from infinikv.core.self_extend import SelfExtend, resident_partials


def self_extend_naive(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    pages: PageList,
    num_keys: int,
    rope: RotaryEmbedding,
    se: SelfExtend,
) -> Partial:
    """What `self_extend_attention` computes (same arguments): the pages gathered, then the
    neighbor and grouped partial attentions of `resident_partials`, merged."""
    k, v = pages.gather(k_pages, num_keys), pages.gather(v_pages, num_keys)  # (T, Hkv, d)
    k_pos = pages.positions[:num_keys]  # (T,)
    return merge_partials(resident_partials(q, q_pos, k, rotate(k, rope.at(k_pos)), v, k_pos, rope, se))
