"""The decoder's projections: dense, or weight-only quantized in groups of 32 inputs.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infinikv.errors import UnsupportedModelError

# GGUF Q4_1's and Q8_0's block size: re-quantizing such a tensor with this group recovers it.
GROUP = 32
# The CPU int4 kernel packs the inner dimension in tiles of this many 16-column blocks.
INNER_K_TILES = 1


class DenseLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (N, in) -> (N, out)


def _groups(w: torch.Tensor) -> torch.Tensor:
    """(N, K) float weight -> (N, K/GROUP, GROUP) float32, refusing shapes the kernel cannot pack."""
    N, K = w.shape
    if K % GROUP or N % 16:
        raise UnsupportedModelError(f"int4 needs in_features % {GROUP} == 0 and out_features % 16 == 0, got {N}x{K}")
    return w.detach().float().view(N, K // GROUP, GROUP)


class Int4Plane(nn.Module):
    """One int4 matrix for the CPU kernel, which computes w = (q - 8) * scale + zero."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()  # q: (N, K) integers in [0, 15]; scale, zero: (N, K/GROUP)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), INNER_K_TILES))
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
        )  # (K/GROUP, N, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)  # bf16


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as uint4 per group of GROUP inputs: w = s*q + m."""

    def __init__(self, dense: DenseLinear):
        super().__init__()
        groups = _groups(dense.weight)
        low, high = groups.amin(-1), groups.amax(-1)  # (N, K/G)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.plane = Int4Plane(q.flatten(1), scale, low + 8 * scale)
        self.bias = dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.plane(x.bfloat16()).to(x.dtype)  # (N, out)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 per group of GROUP inputs: w = s*q, q in [-127, 127].

    The kernel takes 4-bit values only, so W is two int4 planes: with u = q + 128 = 16h + l
    (h, l in [0, 15]), w = 16s*(h - 8) + s*(l - 8) + 8s, i.e. plane h with scale 16s and
    zero 0, plus plane l with scale s and zero 8s."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        groups = _groups(weight)
        scale = (groups.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (N, K/G)
        u = (torch.round(groups / scale[..., None]).clamp(-127, 127) + 128).flatten(1)  # (N, K) in [1, 255]
        self.high = Int4Plane(u.div(16, rounding_mode="floor"), 16 * scale, torch.zeros_like(scale))
        self.low = Int4Plane(u.remainder(16), scale, 8 * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.bfloat16()
        return self.high(xb).float() + self.low(xb).float()  # (N, out), summed in float32


def quantize_int4(module: nn.Module) -> None:
    """Replace every DenseLinear inside `module` with its Int4Linear, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, DenseLinear):
            setattr(module, name, Int4Linear(child))
        else:
            quantize_int4(child)
