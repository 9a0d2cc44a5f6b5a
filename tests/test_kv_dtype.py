"""KV pages in bfloat16 (the `kv_dtype` setting): a session saved under one dtype resumes
under the other with the values it kept; on the default model over real prose the bfloat16
pages make the float32 pages' next-token choices, in prefill chunks and in decode steps.
(The kernels' bfloat16 pages against the reference: test_kernel_cpu.py, test_decoder_stack.py;
batched against alone: test_batching.py.)"""

from __future__ import annotations

import pytest
import torch

from infinikv.cli import _build_parser, _settings
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed
from infinikv.evaluation.haystack import HaystackMissing, debian_reference_text
from infinikv.memory.store import InProcessBlockStore

from .conftest import nan_pool, ours_from_hf, random_ids, tiny_hf_model

PAGE = 4
CFG = LongContextConfig.derive(256, PAGE, resident=32, sinks=8, window=12, group=2, top_k=8)


def test_the_flag_reaches_the_settings() -> None:
    args = _build_parser().parse_args(["generate", "hi", "--kv-dtype", "bfloat16"])
    assert _settings(args).kv_dtype == "bfloat16"
    assert _settings(_build_parser().parse_args(["generate", "hi"])).kv_dtype is None


@pytest.mark.parametrize("saved, resumed", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_session_resumes_under_the_other_kv_dtype(saved, resumed) -> None:
    """A server restarted with another `--kv-dtype` loads a parked session: its resident keys
    and values are the saved ones (rounded where the new pages are narrower), its memory the
    same, and it goes on (no unwritten slot read: fresh pages are NaN)."""
    model = ours_from_hf(tiny_hf_model("llama", seed=6, max_position_embeddings=256))
    store = InProcessBlockStore()
    pool = nan_pool(model, 200, PAGE, CFG, saved)
    seq = Sequence(pool, CFG, model.cfg, store, "s:1:")
    feed(model, pool, seq, random_ids(50, 0), 7)
    store.put_many(seq.save(store, "s:1:", index_snapshot=True))
    assert seq.table.evicted_blocks > 0

    other = nan_pool(model, 200, PAGE, CFG, resumed)
    back = Sequence.restore(model, other, CFG, store, "s:1:")
    assert back.tokens == seq.tokens and back.table.blocks == seq.table.blocks
    n = seq.table.resident
    for cache in ("k", "v"):
        kept = seq.table.page_list().gather(getattr(pool, cache)[0], n)
        got = back.table.page_list().gather(getattr(other, cache)[0], n)
        assert got.dtype == resumed
        assert torch.equal(got, kept.to(resumed))
    assert back.long_state is not None and seq.long_state is not None
    assert back.long_state.memory.tokens == seq.long_state.memory.tokens
    logits = feed(model, other, back, random_ids(9, 2), 4, logits="all")
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_bfloat16_pages_make_float32_pages_choices_on_real_prose(cpu_kernels) -> None:
    """Teacher-forced over ~1.5k tokens of the Debian Reference: 512-token prefill chunks
    (PyTorch's attention over widened keys), then 64 decode steps (the C kernels reading
    bfloat16 rows)."""
    try:
        text = debian_reference_text()[:8000]
    except HaystackMissing as e:
        pytest.skip(str(e))
    model = cpu_kernels.model
    ids = cpu_kernels.tokenizer(text)["input_ids"][:1600]
    prompt, steps = ids[:-64], ids[-64:]

    def logits(kv_dtype: torch.dtype) -> torch.Tensor:
        pool = model.new_page_pool(2048, 16, dtype=kv_dtype)
        seq = Sequence(pool)
        chunks = feed(model, pool, seq, prompt, 512, logits="all")
        return torch.cat([chunks, *(feed(model, pool, seq, [t], 1, logits="all") for t in steps)])

    want, got = logits(torch.float32), logits(torch.bfloat16)
    agree = (got.argmax(-1) == want.argmax(-1)).float()
    assert agree.mean() > 0.97 and agree[-64:].mean() > 0.95, (agree.mean(), agree[-64:].mean())
    gap = (got.log_softmax(-1) - want.log_softmax(-1)).abs().amax(-1)
    assert gap.median() < 0.05, gap.median()
