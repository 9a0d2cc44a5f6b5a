"""A sequence saved to a block store and restored (after a restart) continues exactly as if it
had never left: same logits, same memory, on tiny random models with NaN-filled pages."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import InProcessBlockStore

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

PAGE = 4


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama", seed=6, max_position_embeddings=256))


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CFG = LongContextConfig.derive(256, PAGE, resident=32, sinks=8, window=12, group=2, top_k=8)


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("snapshots", ["every save", "first save only"])
# (the span keys were placed with, the restoring server's): a memory keeps its own span.
@pytest.mark.parametrize("spans", [(1, 1), (16, 16), (16, 1)])
def test_restored_sequence_continues_bit_identically(model, snapshots, granularity, spans) -> None:
    cfg = replace(CFG, granularity=granularity, max_blocks=3, span=spans[0])
    store = InProcessBlockStore()
    pool = nan_pool(model, max_tokens=200, page_size=PAGE, long_context=cfg)
    seq = Sequence(pool, cfg, model.cfg, store, "s:1:")
    feed(model, pool, seq, ids(50, 0), 7)
    store.put_many(seq.save(store, "s:1:", index_snapshot=True))
    feed(model, pool, seq, ids(23, 1), 5)  # more evictions after the first snapshot
    store.put_many(seq.save(store, "s:1:", index_snapshot=snapshots == "every save"))
    assert seq.table.evicted_blocks > 0 and len(seq) == 73

    other_pool = nan_pool(model, max_tokens=200, page_size=PAGE, long_context=cfg)
    other_pool.allocate(3)  # different page ids than the original
    back = Sequence.restore(model, other_pool, replace(cfg, span=spans[1]), store, "s:1:")
    assert back.long_state is not None and back.long_state.memory is not None
    assert back.long_state.memory.spec.span == spans[0]
    assert back.tokens == seq.tokens and back.table.blocks == seq.table.blocks
    assert back.table.page_list().sinks == 8  # restored keys are re-rotated for the moved sinks
    assert back.long_state is not None and back.long_state.memory is not None
    assert back.long_state.memory.tokens == seq.table.evicted_blocks * PAGE

    more = ids(9, 2)
    want = feed(model, pool, seq, more, 4, logits="all")
    got = feed(model, other_pool, back, more, 4, logits="all")
    assert torch.equal(got, want)


def saved_sequence(model, prefix: str, prompt: list[int]):
    """A store holding a sequence fed `prompt` (8-token chunks), saved with its index
    snapshot; the pool it was fed in; the sequence."""
    store = InProcessBlockStore()
    pool = nan_pool(model, max_tokens=200, page_size=PAGE, long_context=CFG)
    seq = Sequence(pool, CFG, model.cfg, store, prefix)
    feed(model, pool, seq, prompt, 8)
    store.put_many(seq.save(store, prefix, index_snapshot=True))
    return store, pool, seq


def test_missing_or_corrupt_snapshot_is_refused_and_frees_its_pages(model) -> None:
    store, pool, seq = saved_sequence(model, "s:2:", ids(60, 3))
    free = pool.num_free
    with pytest.raises(CorruptSnapshotError, match="no sequence snapshot"):
        Sequence.restore(model, pool, CFG, store, "s:nothing:")
    store.put_many({f"s:2:block:{seq.table.blocks[-1]}": b"\x00short"})
    with pytest.raises(CorruptSnapshotError, match="s:2:"):
        Sequence.restore(model, pool, CFG, store, "s:2:")
    assert pool.num_free == free


def test_a_snapshot_an_older_build_laid_out_differently_is_refused(model) -> None:
    """Its block payloads have the same length in another order: refused, not read scrambled."""
    import json

    store, pool, _ = saved_sequence(model, "s:3:", ids(20, 4))
    (raw,) = store.get_many(["s:3:sequence"])
    meta = json.loads(raw)
    del meta["layout"]
    store.put_many({"s:3:sequence": json.dumps(meta).encode()})
    free = pool.num_free
    with pytest.raises(CorruptSnapshotError, match="laid out .*older build"):
        Sequence.restore(model, pool, CFG, store, "s:3:")
    assert pool.num_free == free
