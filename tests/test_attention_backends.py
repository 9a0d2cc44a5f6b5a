"""The Triton and CPU-kernel backends end to end against the PyTorch one: the whole
model's logits over chunked prefill, eviction into memory and decode steps (Triton's
interpreter on CPU; the same on CUDA, marked gpu), and the backend choice."""

from __future__ import annotations

import pytest
import torch

from infinikv.attention import cpu as cpu_backend
from infinikv.attention.backends import resolve_backend
from infinikv.attention.cpu import cpu_causal_attention, cpu_long_context_attention
from infinikv.attention.triton import triton_causal_attention, triton_long_context_attention
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed
from infinikv.kernels.cpu import build
from infinikv.model.linear import few_row_kernels

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

PAGE = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def hf_model():
    # head_dim 64: the kernels' dot products need a rotary half-width of at least 16.
    sizes = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tiny_hf_model("llama", seed=7, **sizes)


def config(group: int = 2, **kw) -> LongContextConfig:
    """Self-Extend groups of `group`: a window of 12 neighbours, or with groups of one (the
    defaults' kind) what the sinks leave of the resident tokens."""
    placement = dict(window=12, group=group) if group > 1 else dict(group=1)
    cfg = LongContextConfig.derive(256, PAGE, resident=32, sinks=8, **placement, **kw)
    cfg.validate(256, PAGE)
    return cfg


def logits_of(model, cfg, ids, prefill_chunk=7, decode_steps=5):
    """Chunked prefill of all but the last tokens, then one token per forward (decode)."""
    pool = nan_pool(model, max_tokens=400, page_size=PAGE, long_context=cfg)
    seq = Sequence(pool, cfg, model.cfg)
    head, tail = ids[:-decode_steps], ids[-decode_steps:]
    logits = [feed(model, pool, seq, head, prefill_chunk, logits="all")]
    logits += [feed(model, pool, seq, [t], 1) for t in tail]
    return torch.cat(logits), seq


def backend_param():
    """(backend, device): Triton on every device here (its interpreter on CPU), the C kernels on CPU."""
    cases = [pytest.param("triton", d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in DEVICES]
    return pytest.mark.parametrize("backend, device", [*cases, ("cpu", "cpu")])


LONG_CONTEXT = {"triton": triton_long_context_attention, "cpu": cpu_long_context_attention}
CAUSAL = {"triton": triton_causal_attention, "cpu": cpu_causal_attention}


@backend_param()
@pytest.mark.parametrize(
    "granularity, token_top_k, group", [("token", 0, 2), ("block", 0, 2), ("block", 5, 2), ("block", 5, 1)]
)
def test_long_context_logits_match_torch_backend(
    hf_model, backend, device, granularity, token_top_k, group
) -> None:
    model = ours_from_hf(hf_model).to(device)
    ids = torch.randint(0, 160, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    kw = dict(granularity=granularity, top_k=6, max_blocks=3, token_top_k=token_top_k, group=group)
    want, _ = logits_of(model, config(**kw), ids)
    model.long_context_attention = LONG_CONTEXT[backend]
    model.use_few_rows(few_row_kernels(backend))
    got, seq = logits_of(model, config(**kw), ids)
    assert seq.table.evicted_blocks > 5  # memory in play at prefill and decode
    assert seq.table.page_list().sinks == 8  # and the sinks moved beside the window (PageList.of)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "chunk_dtype, tol, group", [("float32", 2e-4, 2), ("bfloat16", 5e-2, 2), ("float32", 2e-4, 1)]
)
def test_cpu_prefill_chunks_in_chunk_dtype_match_torch_backend(hf_model, chunk_dtype, tol, group) -> None:
    """Prefill chunks of 24 positions (more than a draft verification) past the window read
    the resident keys in chunk_dtype on the CPU backend; the PyTorch backend stays float32.
    Groups of one (the defaults) attend to the resident keys in one causal run."""
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    placement = dict(window=28, group=group) if group > 1 else dict(group=1)
    cfg = LongContextConfig.derive(256, PAGE, resident=64, sinks=8, **placement, chunk_dtype=chunk_dtype)
    cfg.validate(256, PAGE)
    want, _ = logits_of(ours_from_hf(hf_model), cfg, ids, prefill_chunk=24)
    model = ours_from_hf(hf_model)
    model.long_context_attention = cpu_long_context_attention
    model.use_few_rows(few_row_kernels("cpu"))
    got, seq = logits_of(model, cfg, ids, prefill_chunk=24)
    assert seq.table.evicted_blocks > 5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if chunk_dtype == "bfloat16":  # the chunks past the window did read bfloat16
        assert (got[:-5] - want[:-5]).abs().max() > 2e-4


@backend_param()
def test_plain_causal_logits_match_torch_backend(hf_model, backend, device) -> None:
    """Chunks of 7 queries (14 rows per kv-head: the CPU kernel takes them, as it takes a
    draft verification) and decode steps."""
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    want, _ = logits_of(ours_from_hf(hf_model).to(device), None, ids)
    model = ours_from_hf(hf_model).to(device)
    model.attention = CAUSAL[backend]
    model.use_few_rows(few_row_kernels(backend))
    got, _ = logits_of(model, None, ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("long_context", [False, True], ids=["causal", "long-context"])
def test_chunks_take_torch_path_where_kernels_lack_avx512(hf_model, monkeypatch, long_context) -> None:
    """Prefill chunks of 24 positions (48 rows per kv-head) attend through torch's kernel, bit
    for bit the PyTorch backend's logits, where the kernels were built without AVX-512 (their
    tiles run slower there); with it, through the tiles (not bit for bit)."""
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(6)).tolist()
    cfg = None
    if long_context:
        cfg = LongContextConfig.derive(256, PAGE, resident=64, sinks=8, group=1, chunk_dtype="float32")
        cfg.validate(256, PAGE)
    want, _ = logits_of(ours_from_hf(hf_model), cfg, ids, prefill_chunk=24, decode_steps=6)
    model = ours_from_hf(hf_model)
    model.attention, model.long_context_attention = cpu_causal_attention, cpu_long_context_attention
    for wide in (False, True):
        monkeypatch.setattr(cpu_backend, "wide_vectors", lambda wide=wide: wide)
        got, seq = logits_of(model, cfg, ids, prefill_chunk=24, decode_steps=6)
        assert torch.equal(got[:144], want[:144]) != wide  # the six chunks
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        assert not long_context or seq.table.evicted_blocks > 5


def test_backend_choice(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32, 64) == "cpu"
    assert resolve_backend("auto", cpu, torch.bfloat16, 64) == "torch"  # the C kernels take float32
    assert resolve_backend("auto", cpu, torch.float32, 96) == "torch"
    assert resolve_backend("torch", cpu, torch.float32, 64) == "torch"
    with pytest.raises(ValueError, match="float32 models with head_dim"):
        resolve_backend("cpu", cpu, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("triton", cpu, torch.float32, 64)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("cuda", cpu, torch.float32, 64)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    build.library.cache_clear()
    try:
        assert resolve_backend("auto", cpu, torch.float32, 64) == "torch"  # no compiler: PyTorch
        with pytest.raises(
            ValueError, match="could not be built: could not run the C compiler .*nonexistent"
        ):
            resolve_backend("cpu", cpu, torch.float32, 64)
    finally:
        monkeypatch.undo()
        build.library.cache_clear()
