"""The decoder's projections: dense, bfloat16 weights, or weight-only quantized in groups
of 32 inputs.

`--quantize bf16` stores every projection's weight (and the output head) as bfloat16, half
float32's bytes; activations, the KV cache and everything else stay float32. Inputs of few
rows go through the CPU kernel: on CPUs with AVX512-BF16 it rounds them to bfloat16 and sums
the exact products in float32 (VDPBF16PS), elsewhere it widens the weights and multiplies
float32 inputs; more rows (prefill chunks) are rounded to bfloat16 for torch's bfloat16
matmul (oneDNN, the same instructions where the CPU has them) and the result widened back.

`--quantize int4` keeps the activations, the KV cache and everything else in float32;
only the weight matrices are stored quantized and multiplied by torch's CPU int4 kernel
(bf16 activations and scales inside the kernel):

* the decoder layers' matrices as int4 with a scale and an offset per group (`Int4Linear`);
  with min/max quantization per group this is lossless for weights that came from a GGUF
  Q4_1 file (llama.cpp's Q4_1: groups of 32, scale and minimum per group, the group's
  minimum at q = 0 and maximum at q = 15), as the default model's layers do;
* the output head as int8 with one scale per group (`Int8Linear`), two int4 planes through
  the same kernel; symmetric absmax quantization is llama.cpp's Q8_0, the format of the
  default model's (tied) token embedding, so that grid too is recovered exactly.

The kernel is built for few rows: it beats a float32 matmul at decode and draft
verification, and loses 2-2.5x on prefill chunks. So on CPUs with AVX512-BF16 (`bf16_dot`),
with the CPU kernels attached, inputs of many rows multiply the Q4 blocks de-quantized to
bfloat16 in torch's bfloat16 matmul instead (~0.1 ms per matrix). `--quantize int4-decode`
keeps the float32 weights as well (the memory of both) and sends inputs of more than
QUANTIZED_MAX_ROWS rows through them: prefill at float32's speed, decode at int4's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infinikv.attention.interface import AttentionBackend, LongContextAttentionBackend
from infinikv.errors import UnsupportedModelError
from infinikv.kernels.cpu.ops import bf16_dot, q4_blocks, q4_to_bf16, q8_blocks

QUANTIZATIONS = ("none", "bf16", "int4", "int4-decode")
# GGUF Q4_1's and Q8_0's block size: re-quantizing such a tensor with this group recovers it.
GROUP = 32
# The CPU int4 kernel packs the inner dimension in tiles of this many 16-column blocks.
INNER_K_TILES = 1
# Up to this many input rows the int4 kernel beats float32 on this 2-core CPU (SmolLM2's
# gate/up matrix, 3072x576: 0.97 vs 1.47 ms at 32 rows, 1.99 vs 1.00 ms at 64).
QUANTIZED_MAX_ROWS = 32


# x W^T for inputs of few rows (the CPU kernel, `infinikv.kernels.cpu.ops.linear`).
FewRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecoderStack:
    """Every decoder layer of a forward of few rows in one call, for sequences that attend as
    `attention` does with at most `max_query_rows` query rows per kv-head, and long-context
    steps that `long_context_attention` sends to it (below the neighbor window, one row)."""

    layer_table: Callable[..., tuple[Any, int]]  # the layers' weights, prepared once
    run: Callable[..., None]
    attention: AttentionBackend
    long_context_attention: LongContextAttentionBackend
    max_query_rows: int


@dataclass(frozen=True)
class FewRowKernels:
    """Kernels for inputs of few rows (decode steps, draft verifications; the CPU's are
    `infinikv.kernels.cpu.ops`, which documents the arguments): `linear` for one projection,
    a decoder layer's work before and after attention in one call each, and `stack` for
    every layer at once."""

    linear: FewRows
    norm_project: Callable[..., torch.Tensor]  # rms_norm, then a projection
    mlp_residual: Callable[..., None]  # output projection, norm, MLP and residuals, in place
    stack: DecoderStack | None = None


# Inputs of at most this many rows (decode steps, verifications, batches with short prompts'
# pieces) go through a FewRows kernel where the model has one, by weight dtype
# (benchmarks/bench_kernels_cpu.py, SmolLM2's weights on a 2-core CPU): float32 weights
# 18-71 ms for 1-32 rows against BLAS's 44-95 ms (AMD), 60.6 / 97.9 ms at 32 / 64 rows
# against 60.8 / 86.3 (Xeon; batches of 64 rows: docs/performance.md); bfloat16 ones 9 / 14
# ms for 1 / 5 rows against 20 / 23 ms for torch's bfloat16 matmul, which overtook the
# widening kernel from ~16 rows (Xeon); int4 (Q4 layers, a Q8 head: uint8 and int8 blocks)
# 11-64 ms against torch's int4 kernel's 14-95 ms (Xeon).
FEW_ROWS = {torch.float32: 64, torch.bfloat16: 12, torch.uint8: 32, torch.int8: 32}
# bfloat16 weights on CPUs with AVX512-BF16 (`bf16_dot`): 12 / 32 / 64 rows in 9-10 / 20 / 37
# ms against torch's 18-20 / 23-30 / 35-46 (AMD Zen 5); as many rows as float32, so that short
# prompts share forwards with decode tokens (docs/performance.md, "bf16 prompts in pieces").
BF16_DOT_ROWS = 64


@functools.cache
def few_rows_limit(dtype: torch.dtype) -> int:
    """Most rows of x the FewRows kernels take for weights of `dtype` on this CPU (0: none)."""
    if dtype == torch.bfloat16 and bf16_dot():
        return BF16_DOT_ROWS
    return FEW_ROWS.get(dtype, 0)


def dense(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, few_rows: FewRows | None = None
) -> torch.Tensor:
    """x (N, in) W^T (+ b) -> (N, out) in x's dtype: through `few_rows` for inputs of at most
    few_rows_limit(weight dtype) rows; a weight of another dtype (bf16 weights) multiplies x
    rounded to it."""
    if few_rows is not None and x.shape[0] <= few_rows_limit(weight.dtype):
        y = few_rows(x.contiguous(), weight)
    elif weight.dtype != x.dtype:
        y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    else:
        return F.linear(x, weight, bias)
    return y if bias is None else y + bias


class DenseLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.few_rows: FewRows | None = None

    @classmethod
    def of(cls, weight: torch.Tensor) -> DenseLinear:
        """A bias-free projection holding `weight` (N, in) itself."""
        with torch.device("meta"):
            layer = cls(*weight.shape)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        return layer

    @property
    def kernel_weight(self) -> torch.Tensor:
        """The weight as the few-row kernels read it."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias, self.few_rows)  # (N, in) -> (N, out)


def _groups(w: torch.Tensor) -> torch.Tensor:
    """(N, K) float weight -> (N, K/GROUP, GROUP) float32, refusing shapes the kernel cannot pack."""
    N, K = w.shape
    if K % GROUP or N % 16:
        raise UnsupportedModelError(
            f"the int4 kernel needs in_features % {GROUP} == 0 and out_features % 16 == 0, got {N}x{K}"
        )
    return w.detach().float().view(N, K // GROUP, GROUP)


class Int4Plane(nn.Module):
    """One int4 matrix for the CPU kernel, which computes w = (q - 8) * scale + zero."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()  # q: (N, K) integers in [0, 15]; scale, zero: (N, K/GROUP)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), INNER_K_TILES)
        )
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
        )  # (K/GROUP, N, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, K) bfloat16 -> (N, out) bfloat16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) through the quantized weight: its `blocks` (Q4 or Q8, `kernel_weight`)
    for inputs of up to few_rows_limit(blocks.dtype) rows where `few_rows` (the CPU kernel) is set,
    else torch's int4 kernel (`quantized`); with `dense` (the float weight, kept), inputs of
    more than QUANTIZED_MAX_ROWS rows go through it instead."""

    def __init__(self, dense: torch.Tensor | None, bias: torch.Tensor | None, blocks: torch.Tensor):
        super().__init__()
        self.dense = dense
        self.bias = bias
        self.register_buffer("blocks", blocks)
        self.few_rows: FewRows | None = None

    @property
    def kernel_weight(self) -> torch.Tensor:
        """The weight as the few-row kernels read it."""
        return self.blocks

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > QUANTIZED_MAX_ROWS:
            return F.linear(x, self.dense, self.bias)  # (N, out)
        if self.few_rows is not None and x.shape[0] <= few_rows_limit(self.blocks.dtype):
            y = self.few_rows(x.contiguous(), self.blocks)  # (N, out)
        else:
            y = self.quantized(x)
        return y if self.bias is None else y + self.bias


class Int4Linear(QuantizedLinear):
    """W stored as uint4 per group of GROUP inputs: w = s*q + m, twice: for torch's int4
    kernel (bf16 activations), and as Q4 blocks for the few-row CPU kernels (float32
    activations and products), which on CPUs with AVX512-BF16 also give many rows' bfloat16
    matmul its weights."""

    def __init__(self, dense: DenseLinear, keep_dense: bool = False):
        groups = _groups(dense.weight)
        low, high = groups.amin(-1), groups.amax(-1)  # (N, K/G)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).flatten(1)  # (N, K)
        super().__init__(dense.weight if keep_dense else None, dense.bias, q4_blocks(q, scale, low))
        self.plane = Int4Plane(q, scale, low + 8 * scale)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.few_rows is not None and bf16_dot():
            # Many rows (prefill chunks) where the CPU has AVX512-BF16: the blocks de-quantized for
            # torch's bfloat16 matmul, 512-token prefill 1.3-1.7x its int4 kernel (performance.md).
            return F.linear(x.bfloat16(), q4_to_bf16(self.blocks)).to(x.dtype)
        return self.plane(x.bfloat16()).to(x.dtype)


class Int8Linear(QuantizedLinear):
    """W stored as int8 per group of GROUP inputs: w = s*q, q in [-127, 127] (no bias); as Q8
    blocks for the few-row CPU kernels.

    torch's kernel takes 4-bit values only, so for it W is two int4 planes: with u = q + 128 =
    16h + l (h, l in [0, 15]), w = 16s*(h - 8) + s*(l - 8) + 8s, i.e. plane h with scale 16s
    and zero 0, plus plane l with scale s and zero 8s."""

    def __init__(self, weight: torch.Tensor, keep_dense: bool = False):
        groups = _groups(weight)
        scale = (groups.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (N, K/G)
        q = torch.round(groups / scale[..., None]).clamp(-127, 127).flatten(1)  # (N, K)
        super().__init__(weight if keep_dense else None, None, q8_blocks(q, scale))
        u = q + 128  # in [1, 255]
        self.high = Int4Plane(u.div(16, rounding_mode="floor"), 16 * scale, torch.zeros_like(scale))
        self.low = Int4Plane(u.remainder(16), scale, 8 * scale)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.bfloat16()
        return (self.high(xb).float() + self.low(xb).float()).to(x.dtype)  # summed in float32


def quantize_int4(module: nn.Module, keep_dense: bool = False) -> None:
    """Replace every DenseLinear inside `module` with its Int4Linear, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, DenseLinear):
            setattr(module, name, Int4Linear(child, keep_dense))
        else:
            quantize_int4(child, keep_dense)


def few_row_kernels(backend: str) -> FewRowKernels | None:
    """The kernels for inputs of few rows of a resolved attention backend: the projections
    and the work around them (None: PyTorch operations and torch's matmul)."""
    if backend == "cpu":
        from infinikv.attention.cpu import cpu_causal_attention, cpu_long_context_attention
        from infinikv.kernels.cpu.ops import (
            FOLD_ROWS,
            decoder_stack,
            layer_table,
            linear,
            mlp_residual,
            norm_project,
        )

        # stack.c attends through the folding kernel, as cpu_causal_attention does up to FOLD_ROWS.
        stack = DecoderStack(
            layer_table, decoder_stack, cpu_causal_attention, cpu_long_context_attention, FOLD_ROWS
        )
        return FewRowKernels(linear, norm_project, mlp_residual, stack)
    return None
