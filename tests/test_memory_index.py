"""FAISS memory index: exact top-k, ids, removal, snapshots, corrupt data."""

from __future__ import annotations

import pytest
import torch

from infinikv.memory.index import CorruptSnapshotError, MemoryIndex, entry_id, split_id


def filled(
    kind: str = "flat", M: int = 500, L: int = 2, H: int = 3, d: int = 64
) -> tuple[MemoryIndex, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    index = MemoryIndex(L, H, d, kind)
    keys = torch.randn(L, M, H, d, generator=g)
    ids = entry_id(torch.arange(M) // 16 + 100, torch.arange(M) % 16)
    for layer in range(L):
        index.add(layer, keys[layer], ids)
    return index, keys, ids


def brute_force(keys: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, k: int):
    scores = torch.einsum("hqd,mhd->hqm", q, keys)  # (H, nq, M)
    top = scores.topk(k, dim=-1)
    return top.values, ids[top.indices]


def test_ids_round_trip() -> None:
    block, offset = split_id(entry_id(torch.tensor([7, 123456]), torch.tensor([0, 65535])))
    assert block.tolist() == [7, 123456] and offset.tolist() == [0, 65535]


def test_flat_search_is_the_brute_force_top_k() -> None:
    index, keys, ids = filled()
    q = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    scores, got = index.search(1, q, 10)
    want_scores, want_ids = brute_force(keys[1], ids, q, 10)
    assert torch.equal(got, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-4)


def test_k_larger_than_memory_returns_everything() -> None:
    index, _, ids = filled(M=7)
    _, got = index.search(0, torch.randn(3, 2, 64), 50)
    assert got.shape == (3, 2, 7) and set(got[0, 0].tolist()) == set(ids.tolist())


def test_hnsw_recall() -> None:
    index, keys, ids = filled("hnsw", M=2000)
    q = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(2))
    _, got = index.search(0, q, 10)
    _, want = brute_force(keys[0], ids, q, 10)
    recall = sum(
        len(set(a.tolist()) & set(b.tolist()))
        for a, b in zip(got.flatten(0, 1), want.flatten(0, 1), strict=True)
    )
    assert recall / want.numel() > 0.95


def test_remove_deletes_from_every_index() -> None:
    index, _, ids = filled(M=64)
    index.remove(ids[:16])
    assert index.ntotal == 48
    _, got = index.search(1, torch.randn(3, 4, 64), 48)
    assert not set(got.flatten().tolist()) & set(ids[:16].tolist())


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_snapshot_round_trip_gives_identical_results(kind) -> None:
    index, _, _ = filled(kind)
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(3))
    restored = MemoryIndex.deserialize(index.serialize())
    assert restored.ntotal == index.ntotal and restored.kind == kind
    for layer in range(2):
        a, b = index.search(layer, q, 8), restored.search(layer, q, 8)
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


@pytest.mark.parametrize("damage", [lambda b: b[:-10], lambda b: b"not json\n" + b[50:], lambda b: b""])
def test_corrupt_snapshot_is_a_clear_error(damage) -> None:
    index, _, _ = filled(M=20)
    with pytest.raises(CorruptSnapshotError, match="corrupt"):
        MemoryIndex.deserialize(damage(index.serialize()))


def test_wrong_key_shape_names_the_shape() -> None:
    index = MemoryIndex(1, 3, 64)
    with pytest.raises(ValueError, match=r"\(M, 3, 64\), got \(5, 64\)"):
        index.add(0, torch.randn(5, 64), torch.arange(5))


def test_block_summary_bounds_every_logit_of_its_block() -> None:
    from infinikv.memory.summary import block_summary, summary_query

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 16, 64, generator=g)  # 50 blocks of 16 keys
    q = torch.randn(7, 64, generator=g)
    bound = summary_query(q) @ block_summary(keys).T  # (7, 50)
    best = torch.einsum("qd,btd->qbt", q, keys).amax(-1)
    assert (bound >= best - 1e-4).all()
    one = keys[:, :1]  # a block of one key: the bound is its logit
    torch.testing.assert_close(summary_query(q) @ block_summary(one).T, q @ one[:, 0].T)
