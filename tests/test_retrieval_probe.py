"""The retrieval probe (evaluation/retrieval.py) on a tiny random model: it measures decode
steps and shared prefill chunks, its chunk ranking "bound-mean" is what the forward reads,
and every ranking captures everything when the budget covers the whole memory."""

from __future__ import annotations

import pytest
import torch

from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed
from infinikv.evaluation.retrieval import CHUNK_RANKINGS, RANKINGS, RetrievalProbe
from infinikv.memory.evicted import EvictedMemory

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

PAGE = 4
# Rankings that need no key sketch (the tiny model's memory has none wider than its heads).
DECODE = {name: RANKINGS[name] for name in ("bound", "exact-logit", "oracle-mass")}


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama", seed=5, max_position_embeddings=256))


def probed_run(model, max_blocks: int) -> RetrievalProbe:
    """80 tokens ingested in chunks of 8 (logits unread: shared blocks), then 3 decode steps."""
    cfg = LongContextConfig.derive(256, PAGE, resident=32, sinks=8, window=12, group=2, max_blocks=max_blocks)
    cfg.validate(256, PAGE)
    probe = RetrievalProbe(model.long_context_attention, DECODE, chunks=True)
    model.long_context_attention = probe
    try:
        pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=cfg)
        seq = Sequence(pool, cfg, model.cfg)
        ids = torch.randint(0, 160, (83,), generator=torch.Generator().manual_seed(3)).tolist()
        feed(model, pool, seq, ids[:80], 8, "none")
        for token in ids[80:]:
            feed(model, pool, seq, [token], 1)
    finally:
        model.long_context_attention = probe.inner
    return probe


def test_probe_measures_decode_steps_and_shared_chunks(model) -> None:
    probe = probed_run(model, max_blocks=2)
    layers = range(model.cfg.num_layers)
    for shares, names in ((probe.shares, DECODE), (probe.chunk_shares, CHUNK_RANKINGS)):
        for name in names:
            for layer in layers:
                values = shares[name, layer]
                assert values and all(0 <= v <= 1 + 1e-6 for v in values), (name, layer)
    medians = probe.layer_medians(chunks=True)
    assert set(medians) == set(CHUNK_RANKINGS) and all(len(m) == len(layers) for m in medians.values())
    # two blocks of a memory of many: no ranking holds every row's heaviest keys
    assert min(medians["bound-mean"]) < 1


def test_every_ranking_captures_everything_when_the_budget_covers_the_memory(model) -> None:
    probe = probed_run(model, max_blocks=1000)
    for shares in (probe.shares, probe.chunk_shares):
        assert shares and all(v == pytest.approx(1.0, abs=1e-5) for vs in shares.values() for v in vs)


def test_the_chunk_ranking_bound_mean_is_what_the_forward_reads(model, monkeypatch) -> None:
    """The probe's "bound-mean" of a shared chunk ranks the same queries the same way as
    the forward's own selection, on the same memory."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = EvictedMemory.rank_blocks

    def recorded(self, layer, queries, max_blocks, ranking, position=0):
        best = real(self, layer, queries, max_blocks, ranking, position)
        if ranking == "bound" and queries.shape[2] == model.cfg.num_heads // model.cfg.num_kv_heads:
            calls.append((queries.clone(), best))
        return best

    monkeypatch.setattr(EvictedMemory, "rank_blocks", recorded)
    probe = probed_run(model, max_blocks=2)
    chunks = len(probe.chunk_shares["bound-mean", 0]) // (8 * model.cfg.num_heads)
    assert chunks > 3
    # each chunk and layer: the probe's "bound-mean" and the forward's rank the same queries
    same = [
        torch.equal(best, other)
        for i, (queries, best) in enumerate(calls)
        for rows, other in calls[i + 1 :]
        if rows.shape == queries.shape and torch.equal(rows, queries)
    ]
    assert len(same) == chunks * model.cfg.num_layers and all(same)
