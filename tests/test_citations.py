"""Citations: where the answering positions attend (attention/tally.py) against transformers'
own attention weights, and the passages an answer cites on the real model and real text."""

from __future__ import annotations

import pytest
import torch

from infinikv.attention.tally import AttentionTally
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

PAGE = 4


def _tallied(model, cfg: LongContextConfig, ids: list[int], chunk: int) -> tuple[Sequence, AttentionTally]:
    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=cfg)
    seq = Sequence(pool, cfg, model.cfg)
    feed(model, pool, seq, ids[:-1], chunk)
    seq.tally = tally = AttentionTally()
    feed(model, pool, seq, ids[-1:], chunk)  # the row whose logits pick the next token
    return seq, tally


@pytest.mark.parametrize("group", [1, 3])
def test_the_tally_of_a_resident_sequence_is_transformers_attention(group: int) -> None:
    """Oracle: transformers' eager attention weights of the last position, averaged over
    layers and heads (with groups, Self-Extend's placement changes them: compared only for
    G = 1; with G = 3 the shares still sum to one and cover every token)."""
    hf = tiny_hf_model("llama", seed=3)
    model = ours_from_hf(hf)
    ids = torch.randint(0, 160, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    cfg = LongContextConfig.derive(
        512, PAGE, resident=256, sinks=8, window=24 if group > 1 else 240, group=group
    )
    _, tally = _tallied(model, cfg, ids, chunk=16)
    shares = tally.shares()
    assert tally.rows == 2 and shares.shape == (90,)
    torch.testing.assert_close(shares.sum(), torch.tensor(1.0, dtype=torch.float64))
    if group == 1:
        with torch.no_grad():
            attentions = hf(torch.tensor([ids]), output_attentions=True).attentions
        want = torch.stack([a[0, :, -1, :] for a in attentions]).mean((0, 1)).double()
        torch.testing.assert_close(shares, want, atol=1e-5, rtol=1e-4)


def test_evicted_tokens_get_their_share_by_the_key_sketch() -> None:
    model = ours_from_hf(tiny_hf_model("llama", seed=3))
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = LongContextConfig.derive(512, PAGE, resident=48, sinks=8, window=32, group=1, token_top_k=64)
    seq, tally = _tallied(model, cfg, ids, chunk=8)
    evicted = seq.table.evicted_blocks * PAGE
    shares = tally.shares()
    assert evicted > 64 and shares.shape == (150,)
    torch.testing.assert_close(shares.sum(), torch.tensor(1.0, dtype=torch.float64))
    memory = shares[8 : 8 + evicted]  # the sinks stay; the blocks after them left
    assert (memory > 0).all() and 0.05 < memory.sum() < 0.95


def test_passages_are_exact_character_spans_best_first(tokenizer) -> None:
    from infinikv.engine.citations import PASSAGE_TOKENS, cite
    from infinikv.engine.lines import line_breaks
    from infinikv.engine.session import DocumentSpan, SectionSpan

    text = "".join(f"Line {i}: the river bends past the old mill, café and all.\n" for i in range(60))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    history = [1, 2, 3, *ids]  # the document starts at token 3 of its session
    half = len(text) // 2
    sections = [SectionSpan("chapter", "One", 0, half, 3, 3 + len(ids) // 2)]
    doc = DocumentSpan("doc_1", "mill.txt", 3, 3 + len(ids), sections)
    shares = torch.zeros(len(history), dtype=torch.float64)
    shares[3 + 100 : 3 + 110] = 0.05  # the most
    shares[3 + len(ids) - 50 : 3 + len(ids) - 45] = 0.02  # in the second half: no section
    shares[3 + 20] = 0.01  # third, and inside chapter "One"
    breaks = line_breaks(tokenizer)
    cited = cite(shares, history, [doc], tokenizer, breaks)
    assert [round(c.share, 3) for c in cited] == [0.5, 0.1, 0.01]
    for c in cited:
        assert text[c.char_start : c.char_end] == c.text and c.name == "mill.txt" and c.document_id == "doc_1"
        assert c.char_end - c.char_start > PASSAGE_TOKENS  # whole tokens of text, with context
        assert text[c.char_start - 1 : c.char_start] in ("", "\n") and c.text.endswith("\n")  # whole lines
    assert cited[2].section == "chapter: One" and cited[1].section is None
    assert cite(torch.zeros(len(history), dtype=torch.float64), history, [doc], tokenizer, breaks) == []


def test_citations_need_long_context_and_a_key_sketch() -> None:
    from infinikv.engine.generator import check_citable
    from infinikv.errors import InfinikvError

    model = ours_from_hf(tiny_hf_model("llama", seed=3))
    plain = Sequence(nan_pool(model, max_tokens=64, page_size=PAGE), None, model.cfg)
    with pytest.raises(InfinikvError, match="need long-context attention"):
        check_citable(plain)
    cfg = LongContextConfig.derive(512, PAGE, resident=48, sinks=8, window=32, group=1, granularity="token")
    with pytest.raises(InfinikvError, match="need granularity block"):
        check_citable(
            Sequence(nan_pool(model, max_tokens=64, page_size=PAGE, long_context=cfg), cfg, model.cfg)
        )
    blocks = LongContextConfig.derive(512, PAGE, resident=48, sinks=8, window=32, group=1)
    check_citable(
        Sequence(nan_pool(model, max_tokens=64, page_size=PAGE, long_context=blocks), blocks, model.cfg)
    )


def test_a_uniform_tally_scores_every_resident_key_at_the_memory_distance() -> None:
    """Oracle in plain PyTorch: each layer's last query row, rotated by the memory distance,
    against the keys before RoPE; softmax per head, the mean over heads and layers."""
    from infinikv.core.self_extend import at_memory_distance

    model = ours_from_hf(tiny_hf_model("llama", seed=3))
    ids = torch.randint(0, 160, (90,), generator=torch.Generator().manual_seed(4)).tolist()
    cfg = LongContextConfig.derive(512, PAGE, resident=256, sinks=8, window=240, group=1)
    seen = []

    class Recording(AttentionTally):
        def observe(self, layer, q, q_position, kv, pages, resident, rope, state) -> None:
            seen.append((q.clone(), pages.gather(kv.k, resident).clone(), rope, state.distance))
            super().observe(layer, q, q_position, kv, pages, resident, rope, state)

    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=cfg)
    seq = Sequence(pool, cfg, model.cfg)
    feed(model, pool, seq, ids[:-1], 16)
    seq.tally = tally = Recording(uniform=True)
    feed(model, pool, seq, ids[-1:], 16)
    want = torch.zeros(90, dtype=torch.float64)
    for q, k, rope, distance in seen:
        qd = at_memory_distance(q, rope, distance)[0]  # (Hq, d)
        g = qd.shape[0] // k.shape[1]
        logits = torch.einsum("hd,thd->ht", qd, k.repeat_interleave(g, dim=1)) / qd.shape[-1] ** 0.5
        want += logits.softmax(-1).mean(0).double()
    torch.testing.assert_close(tally.shares(), want / len(seen), atol=1e-6, rtol=1e-5)
