"""Weight-only quantized linears: int4 layers (Q4_1-style weights), the int8 head (Q8_0-style
weights), and the real model."""

from __future__ import annotations

import pytest
import torch

from infinikv.engine.generator import Generator
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.sequence import Sequence, feed
from infinikv.errors import UnsupportedModelError
from infinikv.model.linear import GROUP, QUANTIZED_MAX_ROWS, DenseLinear, Int4Linear, Int8Linear


def q4_1_weight(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as llama.cpp's Q4_1 de-quantizes it: per group of 32, min at q=0, max at q=15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    q[:, ::GROUP], q[:, 1::GROUP] = 0, 15
    scale = torch.rand(N, K // GROUP, 1, generator=g) * 0.02 + 1e-3
    low = -torch.rand(N, K // GROUP, 1, generator=g) * 0.1
    w = (q.view(N, -1, GROUP) * scale + low).view(N, K)
    return w, q


def q8_0_weight(N: int, K: int, seed: int = 0) -> torch.Tensor:
    """A weight as llama.cpp's Q8_0 de-quantizes it: per group of 32, s*q with max |q| = 127."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), generator=g)
    q[:, ::GROUP] = 127 * (torch.randint(0, 2, (N, K // GROUP), generator=g) * 2 - 1)
    scale = torch.rand(N, K // GROUP, 1, generator=g) * 0.02 + 1e-3
    return (q.view(N, -1, GROUP) * scale).view(N, K)


def dense(w: torch.Tensor, bias: torch.Tensor | None = None) -> DenseLinear:
    layer = DenseLinear(*w.shape, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_int4_matches_a_bf16_matmul_of_the_same_weights() -> None:
    w, _ = q4_1_weight(96, 160)
    bias = torch.randn(96)
    x = torch.randn(5, 160)
    got = Int4Linear(dense(w, bias))(x)
    exact = x @ w.T + bias
    bf16 = (x.bfloat16() @ w.bfloat16().T).float() + bias
    # The kernel's error budget: at most 2x a plain bf16 matmul's error against fp32.
    assert (got - exact).norm() <= 2 * (bf16 - exact).norm() + 1e-6


def test_q4_blocks_become_their_weights_in_bfloat16() -> None:
    """q4_to_bf16: each block's d q + m (float16 scale and minimum) rounded to bfloat16, to
    bfloat16's precision (the same value wherever the sum is computed fused, as with AVX-512)."""
    from infinikv.kernels.cpu.ops import q4_to_bf16

    w, _ = q4_1_weight(48, 224, seed=3)
    layer = Int4Linear(dense(w))
    N, K = w.shape
    nb = K // GROUP
    values = layer.blocks[:, : K // 2].reshape(N, nb, GROUP // 2)
    halves = layer.blocks[:, K // 2 :].contiguous().view(torch.float16)
    nibbles = torch.cat([values & 15, values >> 4], dim=-1)  # byte j: weight j, then j + 16
    d, m = halves[:, :nb].double(), halves[:, nb:].double()
    exact = (nibbles.double() * d[..., None] + m[..., None]).view(N, K)
    got = q4_to_bf16(layer.blocks)
    assert got.dtype == torch.bfloat16 and got.shape == (N, K)
    torch.testing.assert_close(got.float(), exact.float().bfloat16().float(), atol=0, rtol=2**-8)
    with pytest.raises(ValueError, match="Q4 rows"):
        q4_to_bf16(layer.blocks.float())


def test_int4_rows_past_the_kernels_multiply_bf16_weights_where_the_cpu_has_the_dot() -> None:
    """With the CPU kernels attached, more rows than they take: on CPUs with AVX512-BF16 the
    blocks de-quantized to bfloat16 in torch's bfloat16 matmul, else torch's int4 kernel;
    either within 2x a plain bf16 matmul's error against float32."""
    from infinikv.kernels.cpu.ops import bf16_dot, linear, q4_to_bf16
    from infinikv.model.linear import few_rows_limit

    w, _ = q4_1_weight(96, 160, seed=4)
    layer = Int4Linear(dense(w))
    layer.few_rows = linear
    x = torch.randn(few_rows_limit(torch.uint8) + 1, 160)
    got = layer(x)
    if bf16_dot():
        assert torch.equal(got, torch.nn.functional.linear(x.bfloat16(), q4_to_bf16(layer.blocks)).float())
    else:
        assert torch.equal(got, layer.quantized(x))
    exact, bf16 = x @ w.T, (x.bfloat16() @ w.bfloat16().T).float()
    assert (got - exact).norm() <= 2 * (bf16 - exact).norm() + 1e-6


def test_int8_matches_a_bf16_matmul_of_the_same_weights() -> None:
    w = q8_0_weight(96, 160)
    x = torch.randn(5, 160)
    got = Int8Linear(w)(x)
    exact = x @ w.T
    bf16 = (x.bfloat16() @ w.bfloat16().T).float()
    # Two int4 planes, each rounded to bf16 by the kernel, then summed in float32.
    assert got.dtype == torch.float32
    assert (got - exact).norm() <= 2 * (bf16 - exact).norm() + 1e-6


def test_int8_planes_carry_every_signed_value() -> None:
    """q = 127, -127, 3 (u = 255, 1, 131: the planes' extreme nibbles) and all-zero groups, on a
    power-of-two scale so that every product is exact in bf16."""
    w = torch.zeros(16, 32)
    w[0, 0], w[0, 1], w[1, 5], w[1, 6] = 127 / 128, -127 / 128, 127 / 128, 3 / 128
    got = Int8Linear(w)(torch.eye(32))  # column j: W[:, j]
    torch.testing.assert_close(got.T, w, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kept_dense_weight_takes_the_inputs_with_many_rows(kind: str) -> None:
    w, b = q8_0_weight(48, 64), torch.randn(48) if kind == "int4" else None  # the head has no bias

    def make(keep: bool) -> torch.nn.Module:
        return Int4Linear(dense(w, b), keep) if kind == "int4" else Int8Linear(w, keep)

    kept, quantized = make(True), make(False)
    few, many = torch.randn(QUANTIZED_MAX_ROWS, 64), torch.randn(QUANTIZED_MAX_ROWS + 1, 64)
    assert torch.equal(kept(few), quantized(few))
    assert torch.equal(kept(many), torch.nn.functional.linear(many, w, b))
    assert not torch.equal(quantized(many), kept(many))


@pytest.mark.parametrize("make", [lambda w: Int4Linear(dense(w)), Int8Linear])
def test_quantized_linears_refuse_shapes_the_kernel_cannot_pack(make) -> None:
    with pytest.raises(UnsupportedModelError, match="in_features % 32"):
        make(torch.randn(32, 40))


@pytest.mark.slow
@pytest.mark.parametrize("quantize, backend", [("int4", "torch"), ("int4-decode", "torch"), ("int4", "cpu")])
def test_int4_default_model_keeps_greedy_output(default_model, quantize: str, backend: str) -> None:
    """The PyTorch path, and the CPU kernels' (64-row chunks past their rows: on CPUs with
    AVX512-BF16 the blocks de-quantized to bfloat16)."""
    from infinikv.model.loader import load_model
    from infinikv.service.runtime import attach_kernels

    from .conftest import CACHE_DIR

    q4 = load_model(None, CACHE_DIR, quantize=quantize)
    attach_kernels(q4, backend)
    assert all(isinstance(layer.qkv, Int4Linear) for layer in q4.model.layers)
    assert isinstance(q4.model.lm_head, Int8Linear)
    ids = default_model.tokenizer("The lighthouse keeper rose before dawn and climbed the stairs. " * 8)[
        "input_ids"
    ]
    logits = {}
    for name, lm in (("fp32", default_model), ("int4", q4)):
        pool = lm.model.new_page_pool(1024, 16)
        logits[name] = feed(lm.model, pool, Sequence(pool), ids, 64, logits="all")
    agree = (logits["fp32"].argmax(-1) == logits["int4"].argmax(-1)).float().mean().item()
    assert agree > 0.97, agree
    if quantize == "int4-decode":  # the first, 64-row chunk runs the kept float32 weights
        assert torch.equal(logits["int4"][:64], logits["fp32"][:64])
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    want = Generator(default_model, 1024).generate(ids, params).token_ids
    got = Generator(q4, 1024).generate(ids, params).token_ids
    assert got == want


def on_q4_grid(w: torch.Tensor) -> torch.Tensor:
    """w moved to the nearest weights that Q4_1 holds exactly (Int4Linear's min/max grid)."""
    N, K = w.shape
    groups = w.view(N, K // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    return (torch.round((groups - low) / scale) * scale + low).view(N, K)


def test_int4_layers_take_the_cpu_kernels() -> None:
    """With the `cpu` backend attached, int4 projections of few rows go through the C kernels'
    Q4 blocks (the decoder stack included), so the logits of a prefill chunk and decode steps
    are those of a float32 model holding the same weights on the PyTorch path: exactly with
    float32 activations, within their int8 rounding where the kernels use it (AVX512-VNNI)."""
    import copy

    from infinikv.attention.backends import causal_attention
    from infinikv.kernels.cpu.ops import int8_activations
    from infinikv.model.linear import few_row_kernels, quantize_int4

    from .conftest import nan_pool, ours_from_hf, tiny_hf_model

    # head_dim 64, as the attention kernel needs
    model = ours_from_hf(
        tiny_hf_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DenseLinear):
                module.weight.copy_(on_q4_grid(module.weight))
    grid = copy.deepcopy(model)
    quantize_int4(model)
    ids = torch.randint(0, 160, (30,), generator=torch.Generator().manual_seed(5)).tolist()

    def logits(m) -> torch.Tensor:
        pool = nan_pool(m)
        seq = Sequence(pool)
        return torch.cat([feed(m, pool, seq, ids[:20], 20)] + [feed(m, pool, seq, [t], 1) for t in ids[20:]])

    model.attention = causal_attention("cpu")
    model.use_few_rows(few_row_kernels("cpu"))
    assert model._layer_kernels(1) is not None and model._layer_kernels(20) is not None
    got, want = logits(model), logits(grid)
    if not int8_activations():
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return
    # x rounded to int8 per block of 32 before each projection: 2.2% here, against ~100% for a
    # kernel reading the wrong blocks or scales; the argmax kept wherever the top two stand apart
    assert (got - want).norm() <= 0.04 * want.norm()
    top2 = want.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * (got - want).abs().max()  # no rounding can swap these
    assert clear.sum() >= len(clear) // 2
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
