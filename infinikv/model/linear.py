"""The decoder's projections: dense, or int4 weight-only quantized (group size 32).

int4 keeps the activations, the KV cache and everything else in float32; only the weight
matrices are stored as 4-bit values with a scale and an offset per group of 32 inputs,
and multiplied by torch's CPU int4 kernel (bf16 activations inside the kernel). With
min/max quantization per group this is lossless for weights that came from a GGUF Q4_1
file (llama.cpp's Q4_1: groups of 32, scale and minimum per group, the group's minimum at
q = 0 and maximum at q = 15), as the default model's layers do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infinikv.errors import UnsupportedModelError

# GGUF Q4_1's block size: re-quantizing a Q4_1 tensor with this group recovers it exactly.
INT4_GROUP = 32
# The CPU int4 kernel packs the inner dimension in tiles of this many 16-column blocks.
INNER_K_TILES = 1


class DenseLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (N, in) -> (N, out)


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as uint4 per group of INT4_GROUP inputs: w = s*q + m."""

    def __init__(self, dense: DenseLinear):
        super().__init__()
        w = dense.weight.detach().float()  # (N, K)
        N, K = w.shape
        if K % INT4_GROUP or N % 16:
            raise UnsupportedModelError(
                f"int4 needs in_features % {INT4_GROUP} == 0 and out_features % 16 == 0, got {N}x{K}"
            )
        groups = w.view(N, K // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)  # (N, K/G)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(N, K).int(), INNER_K_TILES)
        )
        # The kernel computes (q - 8) * scale + zero, so zero = low + 8 * scale.
        zero = low + 8 * scale
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
        )  # (K/G, N, 2)
        self.bias = dense.bias
        self.out_features = N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), self.packed, INT4_GROUP, self.scales_and_zeros
        ).to(x.dtype)  # (N, out)
        return y if self.bias is None else y + self.bias


def quantize_int4(module: nn.Module) -> None:
    """Replace every DenseLinear inside `module` with its Int4Linear, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, DenseLinear):
            setattr(module, name, Int4Linear(child))
        else:
            quantize_int4(child)
