"""Byte encoding of KV blocks for the block store: the raw tensor bytes, read back with the
dtype and shape recorded beside them (numpy has no bfloat16, so the bytes go through an
integer view of the same width)."""

from __future__ import annotations

import torch

_BITS = {
    torch.int32: torch.int32,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(_BITS[t.dtype]).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=_BITS[dtype])
    return raw.view(dtype).view(shape)


def block_key(prefix: str, block: int) -> str:
    """Store key of block `block` (k and v of B tokens, every layer) under a sequence's prefix."""
    return f"{prefix}block:{block}"
