"""kNN search over evicted keys by inner product: one FAISS index per (layer, kv-head).

Keys go in before RoPE; the attention searches with R(D) q (see core/self_extend.py),
so the inner product is the true attention logit and the top-k are exact for flat indexes.
Ids are int64 and name (block, offset) via `entry_id`. An "ivf" index is exact (flat) until
it holds IVF_TRAIN_KEYS keys; then k-means over them trains IVF_LISTS lists and every key
moves into them, so a memory that never grows large never pays for training. A sequence
on a CUDA device keeps its flat and IVF indexes on that GPU when the installed faiss is a
GPU build (faiss-gpu-cu12; `gpu_resources`); HNSW has no GPU version. Writes take a lock;
searches of one (layer, head) index run in FAISS without Python-side locking (FAISS
searches are thread-safe).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading

import faiss
import numpy as np
import torch

from infinikv.errors import InfinikvError

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
# HNSW graph degree: faiss's commonly used default for 64-128-dim vectors.
HNSW_M = 32
# HNSW walks an L2 graph, and greedy search by inner product over keys whose norms vary
# (attention keys do) recalled 0.19-0.39 of the true top-32 on SmolLM2 (bench_index.py).
# So keys go in as [k, sqrt(N^2 - |k|^2)] and queries as [q, 0], whose L2 distance is
# |q|^2 + N^2 - 2 q.k: nearest = largest inner product (Bachrach et al. 2014). N, the norm
# bound, is HNSW_NORM_MARGIN x the largest norm of an index's first keys; a later key above
# N gets 0 for its extra coordinate (ranked as if its norm were N).
HNSW_NORM_MARGIN = 2.0
# HNSW search beam: faiss's default 16 gave 0.89 recall@10 on random 64-dim keys in
# tests/test_memory_index.py; 128 gives > 0.95 at a few times the search cost.
HNSW_EF_SEARCH = 128
# IVF lists: ~sqrt of the keys a (layer, head) holds at 64k tokens, faiss's rule of thumb.
IVF_LISTS = 256
# Train once the keys give k-means 39 points per list (faiss warns below that).
IVF_TRAIN_KEYS = 39 * IVF_LISTS
# Lists scanned per search (a quarter): recall@32 0.96-0.997 on SmolLM2 keys (4 layers,
# 10.5k keys per head, queries at the memory distance); 32 lists gave 0.91-0.99.
IVF_PROBES = 64
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


@functools.cache
def gpu_resources(device: torch.device) -> faiss.StandardGpuResources | None:
    """FAISS's GPU resources for the indexes of sequences on `device`, one per process and
    device: None (indexes in host RAM) unless the device is CUDA and the installed faiss is
    a GPU build that sees a GPU. Logs the choice once per device."""
    if device.type != "cuda":
        log.info("FAISS memory indexes in host RAM (device %s)", device)
        return None
    if not hasattr(faiss, "StandardGpuResources"):
        log.info("FAISS memory indexes in host RAM: the installed faiss has no GPU support (faiss-gpu-cu12)")
        return None
    if faiss.get_num_gpus() < 1:
        log.info("FAISS memory indexes in host RAM: faiss sees no GPU")
        return None
    log.info("FAISS memory indexes on %s (flat and IVF; HNSW stays in host RAM)", device)
    return faiss.StandardGpuResources()


def _new_index(kind: str, dim: int) -> faiss.Index:
    base: faiss.Index
    if kind in ("flat", "ivf"):  # an IVF index starts flat (see _trained_ivf)
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":  # L2 over keys with one extra coordinate (see HNSW_NORM_MARGIN)
        hnsw = faiss.IndexHNSWFlat(dim + 1, HNSW_M)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        base = hnsw
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return faiss.IndexIDMap(base)


def entry_bytes(kind: str, dim: int) -> int:
    """Host bytes one entry of a (layer, head) index of `kind` takes: its float32 vector
    and int64 id (flat, and IVF's lists), plus for HNSW the extra coordinate and the
    base level's 2 * HNSW_M int32 links (the upper levels hold ~1/HNSW_M of the entries)."""
    if kind == "hnsw":
        return (dim + 1) * 4 + 8 + 2 * HNSW_M * 4
    return dim * 4 + 8


def _trained_ivf(flat: faiss.IndexIDMap) -> faiss.IndexIVFFlat:
    """The keys and ids of a flat index in an IVF index trained on them."""
    dim = flat.d
    keys = flat.index.reconstruct_n(0, flat.ntotal)
    ids = faiss.vector_to_array(flat.id_map)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, IVF_LISTS, faiss.METRIC_INNER_PRODUCT)
    ivf.train(keys)
    ivf.add_with_ids(keys, ids)
    ivf.nprobe = IVF_PROBES
    return ivf


class MemoryIndex:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        kind: str = "flat",
        device: torch.device | str = "cpu",
    ):
        self.kind = kind
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.device = torch.device(device)
        self._gpu = None if kind == "hnsw" else gpu_resources(self.device)
        self._indexes = [
            [self._placed(_new_index(kind, head_dim)) for _ in range(num_kv_heads)] for _ in range(num_layers)
        ]
        self._norm_bounds = [[0.0] * num_kv_heads for _ in range(num_layers)]  # hnsw; 0: no keys yet
        self._lock = threading.Lock()

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    def _placed(self, index: faiss.Index) -> faiss.Index:
        """A host index moved to this index's GPU (if it has one)."""
        if self._gpu is None:
            return index
        return faiss.index_cpu_to_gpu(self._gpu, self.device.index or 0, index)

    def _on_host(self, index: faiss.Index) -> faiss.Index:
        return index if self._gpu is None else faiss.index_gpu_to_cpu(index)

    @property
    def ntotal(self) -> int:
        """Entries per (layer, head) index (all hold the same ids)."""
        return int(self._indexes[0][0].ntotal)

    @property
    def nbytes(self) -> int:
        """Host bytes of the entries of all (layer, head) indexes (`entry_bytes`)."""
        return self.ntotal * self.num_layers * self.num_kv_heads * entry_bytes(self.kind, self.head_dim)

    def add(self, layer: int, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """keys (M, Hkv, d) before RoPE; ids (M,) int64."""
        if keys.dim() != 3 or keys.shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"keys must be (M, {self.num_kv_heads}, {self.head_dim}), got {tuple(keys.shape)}"
            )
        x = keys.detach().float().cpu().numpy()
        id_arr = ids.cpu().numpy().astype(np.int64)
        with self._lock:
            per_head = self._indexes[layer]
            for h, index in enumerate(per_head):
                index.add_with_ids(self._stored_form(layer, h, x[:, h]), id_arr)
                if self.kind != "ivf" or not isinstance(index, faiss.IndexIDMap):  # trained, or no IVF
                    continue
                if index.ntotal >= IVF_TRAIN_KEYS:
                    per_head[h] = self._placed(_trained_ivf(index))

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Hkv, nq, d) -> scores, ids (Hkv, nq, k'); k' = min(k, ntotal)."""
        if queries.dim() != 3 or queries.shape[0] != self.num_kv_heads or queries.shape[2] != self.head_dim:
            raise ValueError(
                f"queries must be ({self.num_kv_heads}, nq, {self.head_dim}), got {tuple(queries.shape)}"
            )
        k = min(k, self.ntotal)
        x = queries.detach().float().cpu().numpy()
        per_head = [self._search_head(layer, h, x[h], k) for h in range(self.num_kv_heads)]
        scores, ids = zip(*per_head, strict=True)
        return torch.from_numpy(np.stack(scores)), torch.from_numpy(np.stack(ids))

    def _stored_form(self, layer: int, head: int, keys: np.ndarray) -> np.ndarray:
        """Keys (M, d) as the index holds them: as they are, or with the hnsw coordinate."""
        if self.kind != "hnsw":
            return np.ascontiguousarray(keys)
        sq = np.einsum("md,md->m", keys, keys)
        if not self._norm_bounds[layer][head]:
            self._norm_bounds[layer][head] = HNSW_NORM_MARGIN * float(np.sqrt(sq.max(initial=0.0))) or 1.0
        extra = np.sqrt(np.maximum(self._norm_bounds[layer][head] ** 2 - sq, 0.0))
        return np.ascontiguousarray(np.concatenate([keys, extra[:, None]], 1), dtype=np.float32)

    def _search_head(self, layer: int, head: int, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner products and ids of the top-k of one (layer, head) for queries (nq, d)."""
        index = self._indexes[layer][head]
        if self.kind != "hnsw":
            return index.search(np.ascontiguousarray(q), k)
        q_sq = np.einsum("qd,qd->q", q, q)[:, None]
        dist, ids = index.search(np.ascontiguousarray(np.pad(q, ((0, 0), (0, 1)))), k)
        return (q_sq + self._norm_bounds[layer][head] ** 2 - dist) / 2, ids

    def remove(self, ids: torch.Tensor) -> None:
        """Delete entries from every index (HNSW graphs do not support removal)."""
        if self.kind == "hnsw":
            raise InfinikvError(f"{self.kind} indexes do not support removing entries")
        selector = faiss.IDSelectorBatch(ids.cpu().numpy().astype(np.int64))
        with self._lock:
            for per_layer in self._indexes:
                for index in per_layer:
                    index.remove_ids(selector)

    def serialize(self) -> bytes:
        """All indexes as one blob: a JSON header line, then faiss.serialize_index payloads."""
        with self._lock:
            host = [self._on_host(ix) for per_layer in self._indexes for ix in per_layer]
        blobs = [faiss.serialize_index(ix).tobytes() for ix in host]
        header = {
            "kind": self.kind,
            "shape": [self.num_layers, self.num_kv_heads, self.head_dim],
            "sizes": [len(b) for b in blobs],
            "norm_bounds": self._norm_bounds,
        }
        out = io.BytesIO()
        out.write(json.dumps(header).encode() + b"\n")
        for blob in blobs:
            out.write(blob)
        return out.getvalue()

    @classmethod
    def deserialize(cls, data: bytes, device: torch.device | str = "cpu") -> MemoryIndex:
        try:
            head, _, body = data.partition(b"\n")
            header = json.loads(head)
            L, H, d = header["shape"]
            sizes = header["sizes"]
            if len(sizes) != L * H or sum(sizes) != len(body):
                raise ValueError("payload sizes do not match the header")
            made = cls(L, H, d, header["kind"], device)
            if made.kind == "hnsw":
                bounds = [[float(b) for b in per_layer] for per_layer in header["norm_bounds"]]
                if [len(per_layer) for per_layer in bounds] != [H] * L:
                    raise ValueError("norm bounds do not match the shape")
                made._norm_bounds = bounds
            start = 0
            for i, size in enumerate(sizes):
                blob = np.frombuffer(body, dtype=np.uint8, count=size, offset=start)
                made._indexes[i // H][i % H] = made._placed(faiss.deserialize_index(blob))
                start += size
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CorruptSnapshotError(f"memory index snapshot is corrupt: {e}") from e
        return made
