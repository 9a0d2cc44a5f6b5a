"""Byte encoding of KV blocks for the block store, and their reads from it: the raw tensor
bytes, read back with the dtype and shape recorded beside them (numpy has no bfloat16, so
the bytes go through an integer view of the same width). A block's payload is layer-major,
each layer's keys then values, so one layer of a block is one byte range (`layer_range`) a
store reads alone."""

from __future__ import annotations

import torch

from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import BlockStore

_BITS = {
    torch.int32: torch.int32,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(_BITS[t.dtype]).numpy().tobytes()


def from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over a copy of `data`; a bytearray is not copied (the tensor shares it)."""
    raw = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=_BITS[dtype])
    return raw.view(dtype).view(shape)


# Recorded in every snapshot's meta: blocks written by a build with another layout are
# refused instead of read back scrambled (the bytes would have the same length).
LAYOUT = "layer-major"


def check_layout(meta: dict) -> None:
    """Refuse (ValueError) a snapshot whose block payloads are not laid out as this build reads them."""
    found = meta.get("layout", "k|v-major, an older build's")
    if found != LAYOUT:
        raise ValueError(f"block payloads are laid out {found!r}, this build reads {LAYOUT!r}")


def blocks_to_bytes(kv: torch.Tensor) -> list[bytes]:
    """kv (2, L, n, B, Hkv, d) of n blocks -> their payloads."""
    return [to_bytes(kv[:, :, i].transpose(0, 1)) for i in range(kv.shape[2])]


def blocks_from_bytes(
    payloads: list[bytes], dtype: torch.dtype, shape: tuple[int, int, int, int]
) -> torch.Tensor:
    """Payloads of n blocks of shape (L, B, Hkv, d) -> kv (2, L, n, B, Hkv, d)."""
    L, B, H, d = shape
    return _stacked(payloads, dtype, (L, 2, B, H, d)).permute(2, 1, 0, 3, 4, 5)


def layer_range(layer: int, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> tuple[int, int]:
    """(start, length) of one layer's bytes in a block payload."""
    _, B, H, d = shape
    length = 2 * B * H * d * dtype.itemsize
    return layer * length, length


def layers_from_bytes(
    slices: list[bytes], dtype: torch.dtype, shape: tuple[int, int, int, int]
) -> torch.Tensor:
    """One layer's bytes (`layer_range`) of n blocks -> kv (2, n, B, Hkv, d)."""
    _, B, H, d = shape
    return _stacked(slices, dtype, (2, B, H, d)).transpose(0, 1)


def _stacked(payloads: list[bytes], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """n payloads of `shape` each -> (n, *shape): one copy into one buffer, not a tensor per
    payload (a 128k-token decode step reads back hundreds of blocks per layer)."""
    if not payloads:
        return torch.empty(0, *shape, dtype=dtype)
    return from_bytes(bytearray().join(payloads), dtype, (-1, *shape))


def block_key(prefix: str, block: int) -> str:
    """Store key of block `block` (k and v of B tokens, every layer) under a sequence's prefix."""
    return f"{prefix}block:{block}"


def read_blocks(
    store: BlockStore, prefix: str, dtype: torch.dtype, shape: tuple[int, int, int, int], blocks: list[int]
) -> torch.Tensor:
    """Payloads (2, L, n, B, Hkv, d) of a memory's stored blocks, in one store call."""
    payloads = store.get_many([block_key(prefix, b) for b in blocks])
    return blocks_from_bytes(_found(payloads, blocks, prefix), dtype, shape)


def read_layer(
    store: BlockStore,
    prefix: str,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int],
    layer: int,
    blocks: list[int],
) -> torch.Tensor:
    """One layer (2, n, B, Hkv, d) of a memory's stored blocks, in one store call. A function
    of the store and prefix, not a method: the RAM tier calls it, and a bound method would
    make memory and tier a reference cycle that only the cyclic GC frees."""
    slices = store.get_slices([block_key(prefix, b) for b in blocks], *layer_range(layer, dtype, shape))
    return layers_from_bytes(_found(slices, blocks, prefix), dtype, shape)


def _found(payloads: list[bytes | None], blocks: list[int], prefix: str) -> list[bytes]:
    missing = [b for b, p in zip(blocks, payloads, strict=True) if p is None]
    if missing:
        raise CorruptSnapshotError(f"memory blocks {missing[:5]} are missing under {prefix!r}")
    return [p for p in payloads if p is not None]
