"""kNN search over evicted keys: one FAISS inner-product index per (layer, kv-head).

Keys go in before RoPE; the attention searches with R(D) q (see attention/self_extend.py),
so the inner product is the true attention logit and the top-k are exact for flat indexes.
Ids are int64 and name (block, offset) via `entry_id`. Writes take a lock; searches of one
(layer, head) index run in FAISS without Python-side locking (FAISS searches are thread-safe).
"""

from __future__ import annotations

import io
import json
import threading

import faiss
import numpy as np
import torch

from infinikv.errors import InfinikvError

INDEX_KINDS = ("flat", "hnsw")
# HNSW graph degree: faiss's commonly used default for 64-128-dim vectors.
HNSW_M = 32
# HNSW search beam: faiss's default 16 gave 0.89 recall@10 on random 64-dim keys in
# tests/test_memory_index.py; 128 gives > 0.95 at a few times the search cost.
HNSW_EF_SEARCH = 128
# Bits for the offset inside a block in an entry id (blocks of up to 65536 tokens).
OFFSET_BITS = 16


class CorruptSnapshotError(InfinikvError):
    """A memory snapshot could not be read back."""


def entry_id(block: int | torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
    """The int64 id of token `offset` of evicted block `block`."""
    return (torch.as_tensor(block, dtype=torch.long) << OFFSET_BITS) | torch.as_tensor(
        offset, dtype=torch.long
    )


def split_id(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of entry ids."""
    return ids >> OFFSET_BITS, ids & ((1 << OFFSET_BITS) - 1)


def _new_index(kind: str, dim: int) -> faiss.Index:
    base: faiss.Index
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        base = hnsw
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return faiss.IndexIDMap2(base)


class MemoryIndex:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, kind: str = "flat"):
        self.kind = kind
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self._indexes = [[_new_index(kind, head_dim) for _ in range(num_kv_heads)] for _ in range(num_layers)]
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        """Entries per (layer, head) index (all hold the same ids)."""
        return int(self._indexes[0][0].ntotal)

    def add(self, layer: int, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """keys (M, Hkv, d) before RoPE; ids (M,) int64."""
        if keys.dim() != 3 or keys.shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"keys must be (M, {self.num_kv_heads}, {self.head_dim}), got {tuple(keys.shape)}"
            )
        x = keys.detach().float().cpu().numpy()
        id_arr = ids.cpu().numpy().astype(np.int64)
        with self._lock:
            for h, index in enumerate(self._indexes[layer]):
                index.add_with_ids(np.ascontiguousarray(x[:, h]), id_arr)

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Hkv, nq, d) -> scores, ids (Hkv, nq, k'); k' = min(k, ntotal)."""
        if queries.dim() != 3 or queries.shape[0] != self.num_kv_heads or queries.shape[2] != self.head_dim:
            raise ValueError(
                f"queries must be ({self.num_kv_heads}, nq, {self.head_dim}), got {tuple(queries.shape)}"
            )
        k = min(k, self.ntotal)
        x = queries.detach().float().cpu().numpy()
        scores, ids = zip(
            *(index.search(np.ascontiguousarray(x[h]), k) for h, index in enumerate(self._indexes[layer])),
            strict=True,
        )
        return torch.from_numpy(np.stack(scores)), torch.from_numpy(np.stack(ids))

    def remove(self, ids: torch.Tensor) -> None:
        """Delete entries from every index (flat only: HNSW graphs do not support removal)."""
        if self.kind != "flat":
            raise InfinikvError(f"{self.kind} indexes do not support removing entries")
        selector = faiss.IDSelectorBatch(ids.cpu().numpy().astype(np.int64))
        with self._lock:
            for per_layer in self._indexes:
                for index in per_layer:
                    index.remove_ids(selector)

    def serialize(self) -> bytes:
        """All indexes as one blob: a JSON header line, then faiss.serialize_index payloads."""
        with self._lock:
            blobs = [faiss.serialize_index(ix).tobytes() for per_layer in self._indexes for ix in per_layer]
        header = {
            "kind": self.kind,
            "shape": [self.num_layers, self.num_kv_heads, self.head_dim],
            "sizes": [len(b) for b in blobs],
        }
        out = io.BytesIO()
        out.write(json.dumps(header).encode() + b"\n")
        for blob in blobs:
            out.write(blob)
        return out.getvalue()

    @classmethod
    def deserialize(cls, data: bytes) -> MemoryIndex:
        try:
            head, _, body = data.partition(b"\n")
            header = json.loads(head)
            L, H, d = header["shape"]
            sizes = header["sizes"]
            if len(sizes) != L * H or sum(sizes) != len(body):
                raise ValueError("payload sizes do not match the header")
            made = cls(L, H, d, header["kind"])
            start = 0
            for i, size in enumerate(sizes):
                blob = np.frombuffer(body, dtype=np.uint8, count=size, offset=start)
                made._indexes[i // H][i % H] = faiss.deserialize_index(blob)
                start += size
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CorruptSnapshotError(f"memory index snapshot is corrupt: {e}") from e
        return made
