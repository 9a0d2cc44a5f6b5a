"""bf16 weights (`--quantize bf16`): bfloat16 projections and head in a float32 model; few
rows through the CPU kernel (float32 sums; x rounded to bfloat16 on CPUs with AVX512-BF16),
prefill chunks through torch's bf16 matmul."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from infinikv.attention.backends import causal_attention
from infinikv.engine.generator import Generator
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import Sequence, feed
from infinikv.errors import UnsupportedModelError
from infinikv.kernels.cpu.ops import bf16_dot, linear
from infinikv.model.linear import BF16_DOT_ROWS, FEW_ROWS, DenseLinear, dense, few_rows_limit
from infinikv.model.loader import load_model

from .conftest import CACHE_DIR, kernel_rows


# Either side of the kernels' limit with and without the bfloat16 dot product, and beyond.
@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS[torch.bfloat16], FEW_ROWS[torch.bfloat16] + 1, 64, 65, 100])
def test_dense_with_bf16_weights(rows: int) -> None:
    """Up to few_rows_limit(bfloat16) rows (BF16_DOT_ROWS with AVX512-BF16): the kernel,
    float32 sums of products of the exact weights with x (rounded to bfloat16 on CPUs with
    AVX512-BF16, as torch's matmul rounds it, its sums kept in float32); more rows: x rounded
    to bfloat16 times the weights in torch's bf16 matmul. Float32 out, bias added in float32,
    and the same without a kernel (the PyTorch backend)."""
    gen = torch.Generator().manual_seed(rows)
    x, b = torch.randn(rows, 96, generator=gen), torch.randn(40, generator=gen)
    w = torch.randn(40, 96, generator=gen).bfloat16()
    bf16_matmul = F.linear(x.bfloat16(), w).float() + b
    exact = (kernel_rows(x, torch.bfloat16).double() @ w.double().T).float() + b
    got = dense(x, w, b, linear)
    assert got.dtype == torch.float32
    limit = few_rows_limit(torch.bfloat16)
    assert limit == (BF16_DOT_ROWS if bf16_dot() else FEW_ROWS[torch.bfloat16])
    if rows <= limit:
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-5)
        assert (bf16_matmul - exact).abs().max() > 1e-3  # so the kernel did not round its sums
    else:
        torch.testing.assert_close(got, bf16_matmul, atol=0, rtol=0)
    torch.testing.assert_close(dense(x, w, b), bf16_matmul, atol=0, rtol=0)


def test_bf16_weights_are_refused_where_they_do_not_apply() -> None:
    with pytest.raises(UnsupportedModelError, match="CPU only"):
        load_model(None, CACHE_DIR, device="meta", quantize="bf16")
    with pytest.raises(UnsupportedModelError, match="float32 activations"):
        load_model(None, CACHE_DIR, dtype=torch.bfloat16, quantize="bf16")


def rounded_input(m: DenseLinear, x: torch.Tensor) -> torch.Tensor:
    """m's float32 projection of x as the few-row kernel takes it (kernel_rows)."""
    return F.linear(kernel_rows(x, torch.bfloat16), m.weight, m.bias)


@pytest.mark.slow
def test_bf16_weights_on_the_default_model(cpu_kernels, bf16_model) -> None:
    """Every projection and the (untied) head hold bfloat16; in decode-sized chunks the
    logits are those of float32 weights equal to the bfloat16 ones through the plain
    PyTorch path (each projection's input rounded to bfloat16 where the kernel rounds it);
    in 512-token chunks (bfloat16 activations in the matmuls) the float32 model's next-token
    choices, and 32 greedy tokens as float32's."""
    model = bf16_model.model
    weights = [m.weight for m in model.modules() if isinstance(m, DenseLinear)]
    assert len(weights) == 4 * model.cfg.num_layers + 1 and all(w.dtype == torch.bfloat16 for w in weights)
    assert model.embed.dtype == torch.float32  # the lookup and the cache stay float32
    widened = copy.deepcopy(model)
    widened.attention = causal_attention("torch")
    widened.use_few_rows(None)
    for m in widened.modules():
        if isinstance(m, DenseLinear):
            m.weight = torch.nn.Parameter(m.weight.float(), requires_grad=False)
            if bf16_dot():
                m.forward = functools.partial(rounded_input, m)
    f32 = cpu_kernels
    ids = f32.tokenizer("The lighthouse keeper rose before dawn and climbed the stairs. " * 8)["input_ids"]

    def logits(m, chunk: int) -> torch.Tensor:
        pool = m.new_page_pool(1024, 16)
        return feed(m, pool, Sequence(pool), ids, chunk, logits="all")

    got, want_logits = logits(model, 8), logits(widened, 8)
    if bf16_dot():  # an input at a tie of float32's rounding rounds the other way: one bfloat16
        # step, ~1 on the model's massive activations (hundreds): the chunks' choices, and near
        assert (got.argmax(-1) == want_logits.argmax(-1)).all()
        torch.testing.assert_close(got, want_logits, atol=1.0, rtol=0)
    else:
        torch.testing.assert_close(got, want_logits, atol=1e-3, rtol=0)
    agree = (logits(model, 512).argmax(-1) == logits(f32.model, 512).argmax(-1)).float().mean().item()
    assert agree > 0.97, agree
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    want = Generator(f32, 1024).generate(ids, params).token_ids
    assert Generator(bf16_model, 1024).generate(ids, params).token_ids == want
