"""The CPU decoder stack (every layer of a few-row forward in one C call) against the
layer-by-layer path it stands in for: the same logits and the same cache, bit for bit, for
batched decode steps, verification chunks, bf16 and int4 weights, float32 and bfloat16 pools,
biases, a long-context sequence below its window (its grouped keys too) and the self-draft's
first layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from infinikv.attention.cpu import cpu_causal_attention, cpu_long_context_attention
from infinikv.engine.batch import Forward, run_round
from infinikv.engine.regions import LongContextConfig
from infinikv.engine.sequence import Sequence, feed
from infinikv.kernels.cpu import ops
from infinikv.model.linear import DenseLinear, few_row_kernels, few_rows_limit, quantize_int4

from .conftest import nan_pool, ours_from_hf, tiny_hf_model

PAGE = 4


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "bias"])
def hf_model(request):
    # head_dim 64, as the CPU kernels take; biases on q/k/v and o (attention_bias).
    sizes = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    return tiny_hf_model("llama", seed=11, max_position_embeddings=256, attention_bias=request.param, **sizes)


def cpu_model(hf_model, stacked: bool, weights: torch.dtype = torch.float32):
    """The model on the CPU backend, its layers' weights in `weights` (uint8: int4, as Q4
    blocks); `stacked`: with the decoder stack, whose calls it counts."""
    model = ours_from_hf(hf_model)
    if weights == torch.uint8:
        quantize_int4(model.layers)
    else:
        for module in model.modules():
            if isinstance(module, DenseLinear):
                module.weight = nn.Parameter(module.weight.detach().to(weights), requires_grad=False)
    model.attention, model.long_context_attention = cpu_causal_attention, cpu_long_context_attention
    kernels = few_row_kernels("cpu")
    assert kernels is not None and kernels.stack is not None
    model.stack_calls = 0

    def counted(*args):
        model.stack_calls += 1
        kernels.stack.run(*args)

    stack = dataclasses.replace(kernels.stack, run=counted) if stacked else None
    model.use_few_rows(dataclasses.replace(kernels, stack=stack))
    return model


def pool_of(model, max_tokens: int, long_context: LongContextConfig | None = None, kv_dtype=None):
    """A pool that is NaN everywhere until written."""
    pool = nan_pool(model, max_tokens, PAGE, long_context, kv_dtype)
    for cache in (pool.k, pool.k_rope, pool.v, pool.k_group):
        cache.fill_(float("nan"))
    return pool


def assert_same_cache(a, b) -> None:
    for x, y in ((a.k, b.k), (a.k_rope, b.k_rope), (a.v, b.v), (a.k_group, b.k_group)):
        torch.testing.assert_close(x, y, atol=0, rtol=0, equal_nan=True)


def decode_batched(model, long_context: LongContextConfig | None = None, steps: int = 6, kv_dtype=None):
    """Three sequences prefilled apart in chunks of 16 (32 query rows per kv-head, the most
    the stack takes), then `steps` decode steps in one batch, then a 4-token verification of
    the first: every logit, and the pool (its keys and values in `kv_dtype`)."""
    pool = pool_of(model, 600, long_context, kv_dtype)
    gen = torch.Generator().manual_seed(5)
    seqs, logits = [], []
    for length in (9, 23, 40):
        seq = Sequence(pool, long_context, model.cfg)
        logits.append(
            feed(model, pool, seq, torch.randint(0, 160, (length,), generator=gen).tolist(), 16, "all")
        )
        seqs.append(seq)
    for _ in range(steps):
        tokens = torch.randint(0, 160, (len(seqs),), generator=gen).tolist()
        requests = [Forward(s, t) for s, t in zip(seqs, tokens, strict=True)]
        logits += run_round(model, pool, requests, sequences=len(requests), budget=0)
    logits.append(feed(model, pool, seqs[0], [3, 1, 4, 1], 4, "all", evict=False))
    return torch.cat(logits), pool


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16, torch.uint8], ids=["f32", "bf16", "int4"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
def test_stack_equals_layer_by_layer(hf_model, weights, kv_dtype) -> None:
    want, want_pool = decode_batched(cpu_model(hf_model, False, weights), kv_dtype=kv_dtype)
    model = cpu_model(hf_model, True, weights)
    got, pool = decode_batched(model, kv_dtype=kv_dtype)
    assert pool.k.dtype == kv_dtype
    chunks = [9, 16, 7, 16, 16, 8]  # the prefills' (at most few_rows_limit rows: the stack's)
    stacked = sum(n <= few_rows_limit(weights) for n in chunks)
    assert model.stack_calls == stacked + 6 + 1  # + steps, verification
    assert torch.equal(got, want)
    assert_same_cache(pool, want_pool)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
def test_long_context_steps_below_the_window_stack(hf_model, kv_dtype) -> None:
    """Below the neighbor window a long-context forward (a prefill chunk, a decode step, a
    verification) attends causally: the stack takes it and writes the grouped keys too, which
    the steps past the window then read."""
    cfg = LongContextConfig.derive(256, PAGE, resident=64, sinks=8, window=48, group=2)
    cfg.validate(256, PAGE)
    want, want_pool = decode_batched(cpu_model(hf_model, False), cfg, steps=12, kv_dtype=kv_dtype)
    model = cpu_model(hf_model, True)
    got, pool = decode_batched(model, cfg, steps=12, kv_dtype=kv_dtype)
    # the six prefill chunks, the steps before the longest sequence (40 tokens) passes its
    # window (48), the verification
    assert model.stack_calls == 6 + 8 + 1
    assert torch.equal(got, want)
    assert_same_cache(pool, want_pool)


def test_first_layers_only(hf_model) -> None:
    """The self-draft runs the first layers: the stack runs as many."""
    outs = []
    for stacked in (False, True):
        model = cpu_model(hf_model, stacked)
        pool = pool_of(model, 100)
        seq = Sequence(pool, None, model.cfg)
        feed(model, pool, seq, list(range(10)), 16)
        outs.append((model(seq.extend_batch([7]), pool, num_layers=1), pool))
    assert torch.equal(outs[0][0], outs[1][0])
    assert_same_cache(outs[0][1], outs[1][1])


def test_bad_block_table_is_refused(hf_model) -> None:
    model = cpu_model(hf_model, True)
    pool = nan_pool(model, max_tokens=40, page_size=PAGE)
    table = ops.layer_table([layer.stack_weights() for layer in model.layers])
    cfg = model.cfg
    dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    phases = torch.view_as_real(pool.key_phases(torch.tensor([3]))[0])
    caches = (pool.k, pool.k_rope, pool.v, None)
    args = (torch.zeros(1, cfg.hidden_size), table, 3, cfg.rms_norm_eps, dims, phases, None, caches)
    with pytest.raises(ValueError, match="outside the 11 pages"):
        ops.decoder_stack(*args, torch.tensor([5]), [(0, 1, torch.tensor([1, 99]), 8)])
    with pytest.raises(ValueError, match="need 9 >= 1 slots"):
        ops.decoder_stack(*args, torch.tensor([5]), [(0, 1, torch.tensor([1, 2]), 9)])
    with pytest.raises(ValueError, match="num_layers must be in"):
        ops.decoder_stack(*args[:2], 4, *args[3:], torch.tensor([5]), [(0, 1, torch.tensor([1, 2]), 4)])
