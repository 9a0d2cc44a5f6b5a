"""Long-context sequences on tiny random models: wiring, eviction invariants, validation."""

from __future__ import annotations

import re
import weakref

import pytest
import torch

from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed

from .conftest import nan_pool, ours_from_hf, retrieve_blocks, tiny_hf_model

PAGE = 4


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama", seed=5, max_position_embeddings=256))


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def config(**kw) -> LongContextConfig:
    base = dict(resident=32, sinks=8, window=12, group=2)
    base.update(kw)
    cfg = LongContextConfig.derive(256, PAGE, **base)
    cfg.validate(256, PAGE)
    return cfg


def run(model, cfg: LongContextConfig | None, ids: list[int], chunk: int, pool_tokens: int = 400):
    pool = nan_pool(model, max_tokens=pool_tokens, page_size=PAGE, long_context=cfg)
    seq = Sequence(pool, cfg, model.cfg)
    logits = feed(model, pool, seq, ids, chunk, logits="all")
    return logits, seq, pool


def test_no_eviction_inside_the_window_equals_plain_attention(model) -> None:
    ids = tokens(30)
    cfg = config(resident=64, window=40)
    got, seq, _ = run(model, cfg, ids, chunk=7)
    want, _, _ = run(model, None, ids, chunk=7)
    assert seq.table.evicted_blocks == 0
    torch.testing.assert_close(got, want)


def test_group_one_without_eviction_equals_plain_attention_beyond_the_window(model) -> None:
    ids = tokens(40, seed=1)
    got, _, _ = run(model, config(resident=64, window=8, group=1), ids, chunk=5)
    want, _, _ = run(model, None, ids, chunk=5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_nothing_leaves_until_evict_after_then_blocks_leave_down_to_resident(model) -> None:
    """Up to evict_after tokens the plain model's attention exactly; past it the oldest
    blocks leave at once, into the memory."""
    ids = tokens(100, seed=7)
    cfg = config(resident=32, window=16, group=1, evict_after=80)
    got, seq, pool = run(model, cfg, ids[:80], chunk=7, pool_tokens=200)
    want, _, _ = run(model, None, ids[:80], chunk=7, pool_tokens=200)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert seq.table.evicted_blocks == 0 and seq.tokens_before_eviction() == 1
    feed(model, pool, seq, ids[80:], 7)
    assert seq.table.resident <= cfg.resident + PAGE
    assert seq.long_state.memory.tokens == seq.table.evicted_blocks * PAGE == 100 - seq.table.resident


def test_a_pool_grouped_for_another_self_extend_is_refused(model) -> None:
    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=config(group=4))
    seq = Sequence(pool, config(group=2), model.cfg)
    with pytest.raises(ValueError, match="the page pool holds keys grouped by 4, Self-Extend groups by 2"):
        feed(model, pool, seq, tokens(30), 7)


@pytest.mark.parametrize("memory", [True, False])
def test_eviction_keeps_sinks_bounds_residency_and_fills_memory(model, memory) -> None:
    cfg = config(memory=memory)
    ids = tokens(150, seed=2)
    logits, seq, pool = run(model, cfg, ids, chunk=6)
    table = seq.table
    assert torch.isfinite(logits).all()  # NaN-filled fresh pages: no stale reads
    assert table.blocks[:2] == [0, 1]  # sinks (8 tokens = 2 pages) never evicted
    assert table.resident <= cfg.resident + PAGE
    assert table.blocks[2:] == list(range(table.blocks[2], table.blocks[-1] + 1))  # one recent run
    evicted = table.evicted_blocks * PAGE
    assert evicted == 150 - table.resident > 0
    if memory:
        assert seq.long_state.memory.tokens == evicted
        assert seq.long_state.memory.index.ntotal == evicted // PAGE  # one summary per block
    else:
        assert seq.long_state.memory is None
    with pytest.raises(ValueError, match="cannot truncate"):
        seq.truncate(table.evicted_until - 1)
    free_before, held = pool.num_free, len(table.pages)
    seq.release()
    assert held > 0 and pool.num_free == free_before + held


def test_memory_changes_the_output_once_blocks_are_evicted(model) -> None:
    ids = tokens(120, seed=3)
    with_memory, _, _ = run(model, config(), ids, chunk=6)
    sliding, _, _ = run(model, config(memory=False), ids, chunk=6)
    torch.testing.assert_close(with_memory[:30], sliding[:30])  # before the first eviction
    assert (with_memory[-10:] - sliding[-10:]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "overrides,rule",
    [
        ({"sinks": 6}, "multiple of the page size"),
        ({"resident": 20, "window": 12}, "R >= S + W + 2B"),
        ({"resident": 600, "window": 16, "group": 1}, "Self-Extend cannot cover"),
        ({"distance": 300}, "inside the trained range"),
        ({"distance": 200, "span": 64}, "within the trained length 256"),
        ({"index": "lsh"}, "is not one of"),
        ({"sketch_every": 0}, "sketch_every=0 must be >= 1"),
        ({"reread_tail": 0}, "reread_tail=0 >= 1"),
    ],
)
def test_impossible_settings_name_the_rule(overrides, rule) -> None:
    cfg = LongContextConfig.derive(
        256, PAGE, **{**dict(resident=32, sinks=8, window=12, group=2), **overrides}
    )
    with pytest.raises(ValueError, match=re.escape(rule)):
        cfg.validate(256, PAGE)


def test_evicted_blocks_are_written_through_and_deleted_on_release(model) -> None:
    from infinikv.memory.store import InProcessBlockStore

    store = InProcessBlockStore()
    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=config())
    seq = Sequence(pool, config(), model.cfg, store, prefix="ikv:test:")
    feed(model, pool, seq, tokens(100, seed=4), 6)
    blocks = seq.table.evicted_blocks
    assert blocks > 0 and len(store.keys("ikv:test:block:")) == blocks
    memory = weakref.ref(seq.long_state.memory)
    seq.release()
    assert store.keys("ikv:test:") == []
    assert memory() is None  # its RAM is freed at release, not at the next cyclic collection


def test_block_and_token_granularity_agree_when_covering_all_memory(model) -> None:
    """All three (token, block, block with token_top_k) reduce to attention over every
    evicted token at distance D."""
    ids = tokens(120, seed=6)
    token_mode, seq, _ = run(model, config(granularity="token", top_k=10_000), ids, chunk=6)
    block_mode, _, _ = run(model, config(granularity="block", top_k=10_000, max_blocks=10_000), ids, chunk=6)
    assert seq.table.evicted_blocks > 5
    torch.testing.assert_close(block_mode, token_mode, atol=1e-4, rtol=1e-4)
    everything = dict(granularity="block", top_k=10_000, max_blocks=10_000, token_top_k=10_000)
    tokens_of_blocks, _, _ = run(model, config(**everything), ids, chunk=6)
    torch.testing.assert_close(tokens_of_blocks, token_mode, atol=1e-4, rtol=1e-4)


def test_a_span_reads_each_key_at_its_own_distance_in_its_span(model) -> None:
    """Oracle: plain RoPE. The key at position j, searched with R(D) q, has the logit the
    rotated query at position p and key at p - (D + span - 1 - j % span) have."""
    from infinikv.core.rope import RotaryEmbedding, rotate
    from infinikv.core.self_extend import at_memory_distance
    from infinikv.memory.evicted import EvictedMemory, MemorySpec

    L, H, d, span, D = 2, 2, 8, 12, 40
    memory = EvictedMemory(MemorySpec(L, H, d, PAGE, granularity="block", span=span, rope=model.cfg.rope))
    k = torch.randn(L, 3, PAGE, H, d, generator=torch.Generator().manual_seed(0))
    stored = memory.placed([2, 3, 4], k)[0].flatten(0, 1)  # (12, H, d): what add_blocks keeps
    rope, q, p = RotaryEmbedding(model.cfg.rope, d), torch.randn(1, H, d), 500
    for row in range(3 * PAGE):
        j = 2 * PAGE + row
        distance = D + span - 1 - j % span
        want = (
            rotate(q, rope.at(torch.tensor([p])))
            * rotate(k[0, row // PAGE, row % PAGE][None], rope.at(torch.tensor([p - distance])))
        ).sum(-1)
        got = (at_memory_distance(q, rope, D) * stored[row]).sum(-1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_span_changes_memory_attention_alike_in_every_granularity(model) -> None:
    ids = tokens(120, seed=6)
    everything = dict(top_k=10_000, max_blocks=10_000, span=16)
    token_mode, seq, _ = run(model, config(granularity="token", **everything), ids, chunk=6)
    block_mode, _, _ = run(model, config(granularity="block", token_top_k=10_000, **everything), ids, chunk=6)
    at_d, _, _ = run(model, config(granularity="token", top_k=10_000), ids, chunk=6)
    assert seq.table.evicted_blocks > 5
    torch.testing.assert_close(block_mode, token_mode, atol=1e-4, rtol=1e-4)
    assert (token_mode[-10:] - at_d[-10:]).abs().max() > 1e-3


def test_retrieve_blocks_returns_the_blocks_of_the_best_hits() -> None:
    from infinikv.memory.evicted import EvictedMemory, MemorySpec

    mem = EvictedMemory(MemorySpec(1, 1, 8, 4, granularity="block"))
    k = torch.zeros(1, 6, 4, 1, 8)
    k[0, 4, 2, 0, 0] = 5.0  # block 14 (the 5th evicted block), offset 2, matches the query best
    k[0, 1, 0, 0, 0] = 3.0  # block 11 second best
    mem.add_blocks(list(range(10, 16)), k, torch.randn(1, 6, 4, 1, 8))
    assert mem.index.ntotal == 6  # one summary per block
    q = torch.zeros(1, 1, 1, 8)
    q[..., 0] = 1.0
    keys, _ = retrieve_blocks(mem, 0, q, max_blocks=2)
    assert keys.shape == (1, 1, 8, 8)
    assert torch.equal(keys[0, 0, :4], k[0, 1, :, 0]) and torch.equal(keys[0, 0, 4:], k[0, 4, :, 0])
    best, _ = retrieve_blocks(mem, 0, q, max_blocks=1)
    assert torch.equal(best[0, 0], k[0, 4, :, 0])


def test_shared_blocks_give_every_query_its_favourite_first() -> None:
    """A query with large logits everywhere must not take all the shared blocks."""
    from infinikv.memory.evicted import EvictedMemory, MemorySpec

    mem = EvictedMemory(MemorySpec(1, 1, 8, 4, granularity="block"))
    k = torch.zeros(1, 5, 4, 1, 8)
    k[0, :4, 0, 0, 0] = torch.tensor([10.0, 9.0, 8.0, 7.0])  # loud query's blocks 0..3
    k[0, 4, 0, 0, 1] = 1.0  # the quiet query's only match: block 4
    mem.add_blocks(list(range(5)), k, torch.randn(1, 5, 4, 1, 8))
    q = torch.zeros(1, 2, 2, 8)  # two groups of two queries
    q[0, 0, 0, 0], q[0, 0, 1, 1] = 1.0, 1.0  # group 0: a loud and a quiet query
    q[0, 1, :, 0] = 1.0  # group 1: two loud queries
    keys, _ = retrieve_blocks(mem, 0, q, max_blocks=2)
    assert torch.equal(keys[0, 0, :4], k[0, 0, :, 0]) and torch.equal(keys[0, 0, 4:], k[0, 4, :, 0])
    assert torch.equal(keys[0, 1, :4], k[0, 0, :, 0]) and torch.equal(keys[0, 1, 4:], k[0, 1, :, 0])


def test_memory_refuses_blocks_out_of_order() -> None:
    from infinikv.memory.evicted import EvictedMemory, MemorySpec

    mem = EvictedMemory(MemorySpec(1, 1, 8, 4))
    kv = torch.zeros(1, 2, 4, 1, 8)
    mem.add_blocks([3, 4], kv, kv)
    with pytest.raises(ValueError, match="consecutive from 5, got \\[6, 7\\]"):
        mem.add_blocks([6, 7], kv, kv)
    assert mem.tokens == 8 and mem.index.ntotal == 8  # nothing half-added


def test_a_ram_budget_too_small_for_one_retrieval_is_refused(model) -> None:
    cfg = config(granularity="block", max_blocks=100_000, ram_budget_mb=1)
    with pytest.raises(ValueError, match=re.escape("ram_budget_mb=1 holds")):
        cfg.validate(256, PAGE, model.cfg)
    config(granularity="token", max_blocks=100_000, ram_budget_mb=1).validate(256, PAGE, model.cfg)
    # 1 MiB holds the 504 blocks of one retrieval, but not beside them the key sketch's
    # chunk being filled (float32): no evicted block would fit
    cfg = config(granularity="block", max_blocks=14, ram_budget_mb=1)
    with pytest.raises(ValueError, match="ram_budget_mb=1 leaves no room for the search structures"):
        cfg.validate(256, PAGE, model.cfg)


def test_the_ram_budget_sets_the_longest_sequence(default_model) -> None:
    """With a store, a sequence holds its resident window plus the evicted tokens whose
    search structures fit the RAM budget beside one retrieval's blocks; a longer prompt is
    refused before any work, naming the setting."""
    from infinikv.engine.generator import Generator
    from infinikv.engine.sampling import SamplingParams
    from infinikv.errors import InfinikvError
    from infinikv.memory.store import InProcessBlockStore

    model = default_model.config
    small = LongContextConfig.derive(model.max_position_embeddings, 16, ram_budget_mb=680)
    held = small.memory_tokens(model, 16)
    assert held is not None and 0 < held < 8192
    gen = Generator(default_model, 1024, long_context=small, store=InProcessBlockStore())
    assert gen.capacity == small.resident + held
    with pytest.raises(InfinikvError, match=f"capacity of {gen.capacity} tokens \\(raise ram_budget_mb\\)"):
        next(gen.stream([1] * gen.capacity, SamplingParams(max_tokens=1)))
    default = LongContextConfig.derive(model.max_position_embeddings, 16)
    assert (default.memory_tokens(model, 16) or 0) > 160_000  # a book's worth
    assert LongContextConfig.derive(8192, 16, granularity="token").memory_tokens(model, 16) is None


def test_a_forward_whose_logits_no_one_reads_shares_its_blocks_at_every_position(model, monkeypatch) -> None:
    """An ingestion's chunks (and a prompt's before its last) retrieve one set of blocks for
    all their positions: no trailing position ranks the sketch for its own tokens."""
    from infinikv.memory.evicted import EvictedMemory

    cfg = config(granularity="block", max_blocks=2, token_top_k=5)
    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=cfg)
    seq = Sequence(pool, cfg, model.cfg)
    feed(model, pool, seq, tokens(80, seed=8), 6, "none")
    assert seq.table.evicted_blocks > 5
    own_rankings = []
    real = EvictedMemory.top_tokens
    monkeypatch.setattr(EvictedMemory, "top_tokens", lambda *a: own_rankings.append(1) or real(*a))
    assert feed(model, pool, seq, tokens(6, seed=9), 6, "none").shape == (0, model.cfg.vocab_size)
    assert own_rankings == []
    assert feed(model, pool, seq, tokens(6, seed=10), 6).shape == (1, model.cfg.vocab_size)
    assert len(own_rankings) == model.cfg.num_layers  # the last row's, in every layer
    with pytest.raises(ValueError, match="is not one of"):
        seq.extend_batch([1], "first")
