"""The attention backend interface and its registry (chosen by name from settings)."""

from __future__ import annotations

from typing import Protocol

import torch

from infinikv.model.rope import RotaryEmbedding


class AttentionBackend(Protocol):
    """Causal attention of a chunk of queries over one sequence's paged cache.

    q:           (n, Hq, d) queries, before RoPE
    q_positions: (n,) long, absolute positions of the queries
    k_cache:     (P, B, Hkv, d) one layer's key pages, before RoPE
    v_cache:     (P, B, Hkv, d) one layer's value pages
    pages:       (n_pages,) long, the sequence's block table
    kv_len:      tokens of the sequence in the cache (the chunk's own keys included)
    returns:     (n, Hq, d)
    """

    def __call__(
        self,
        q: torch.Tensor,
        q_positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        pages: torch.Tensor,
        kv_len: int,
        rope: RotaryEmbedding,
    ) -> torch.Tensor: ...


def get_backend(name: str) -> AttentionBackend:
    from infinikv.attention.paged_torch import paged_causal_attention

    backends: dict[str, AttentionBackend] = {"torch": paged_causal_attention}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(backends)}")
    return backends[name]
