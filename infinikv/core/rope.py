"""Rotary position embedding as complex phases, applied at read time.

Keys are cached before RoPE, so a key can be placed at any position when it is read
(exact, Self-Extend grouped, or a fixed memory distance). We keep the head dimension
in *interleaved* pair order (dims 2f and 2f+1 form rotary pair f): then a rotation is
one complex multiply. transformers' Llama checkpoints use the half-split order (pair f
is dims f and f + d/2); `interleave_rotary_pairs` permutes the q/k projection rows once
at load time. A dot product q.k is unchanged when both sides are permuted alike.
"""

from __future__ import annotations

import math

import torch

from infinikv.core.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair angular frequency, (head_dim/2,) float64, with the configured scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1 `apply_scaling`: long wavelengths are slowed by `factor`, short ones kept,
        # and the band in between is interpolated smoothly.
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding:
    """A growing table of unit phases exp(i * p * inv_freq) for positions p = 0, 1, ..."""

    def __init__(self, rope: RopeConfig, head_dim: int, device: torch.device | str = "cpu"):
        self.head_dim = head_dim
        self.inv_freq = inverse_frequencies(rope, head_dim).to(device)  # (d/2,) float64
        self._table = torch.empty(0, head_dim // 2, dtype=torch.complex64, device=device)

    def _ensure(self, length: int) -> None:
        if length <= self._table.shape[0]:
            return
        # Doubling keeps the number of rebuilds logarithmic in the longest sequence seen.
        size = max(length, 2 * self._table.shape[0], 1024)
        pos = torch.arange(size, dtype=torch.float64, device=self.inv_freq.device)
        angles = torch.outer(pos, self.inv_freq)  # (size, d/2), float64 keeps large p exact
        self._table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

    def phases(self, length: int) -> torch.Tensor:
        """Phases of positions 0..length-1: (length, d/2) complex64, a view of the table."""
        self._ensure(length)
        return self._table[:length]

    def cos_sin(self, length: int) -> torch.Tensor:
        """(cos, sin) of positions 0..length-1: (length, d/2, 2) float32, a view of the table
        (what a kernel that rotates in place reads)."""
        return torch.view_as_real(self.phases(length))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Phases of arbitrary positions (n,) long -> (n, d/2) complex64."""
        if positions.numel():
            self._ensure(int(positions.max()) + 1)
        return self._table[positions]


def rotate(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` (..., H, d) by `phases` (..., d/2), broadcast over H.

    The multiply runs in complex64 (float32 parts) whatever x's dtype; the result has x's dtype.
    """
    pairs = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2)  # (..., H, d/2, 2)
    if pairs.stride(-1) != 1 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs unit-stride (re, im) pairs
    rotated = torch.view_as_complex(pairs) * phases.unsqueeze(-2)  # (..., H, d/2)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (..., H, d)


def interleave_rotary_pairs(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k projection rows (H*d, ...) or biases (H*d,) from half-split to interleaved."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()  # (d,)
    heads = w.reshape(num_heads, head_dim, *w.shape[1:])
    return heads[:, perm].reshape(w.shape)


def grouped_key_positions(k_pos: torch.Tensor, group: int) -> torch.Tensor:
    """Where a key sits in Self-Extend's grouped region: what `k_group` is rotated at."""
    return k_pos // group
