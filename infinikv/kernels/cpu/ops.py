"""The Python face of the CPU kernels: shape checks, then one ctypes call."""

from __future__ import annotations

import torch

from infinikv.attention.partial import Partial
from infinikv.kernels.cpu.build import library

HEAD_DIMS = (64, 128)
# Each thread takes at least this many slots (benchmarks/bench_kernels_cpu.py).
MIN_KEYS_PER_THREAD = 256
# The projection kernel's weight formats.
LINEAR_WEIGHTS = {torch.float32: "linear_rows", torch.bfloat16: "linear_rows_bf16"}


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype == torch.float32 and head_dim in HEAD_DIMS


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    start: int,
    stop: int,
    causal: bool,
    threads: int | None = None,
) -> Partial:
    """Attention of rotated queries q (n, Hq, d) over the block table's slots [start, stop)
    of k_pages, v_pages (P, B, Hkv, d) (keys already rotated as q expects), page_ids (n_pages,)
    int64. causal: the queries are the last n slots (query i sees slots < stop - n + 1 + i);
    else every query sees every slot. threads: at most this many (default: torch's), each
    with MIN_KEYS_PER_THREAD slots or more. Returns out (n, Hq, d) and lse (n, Hq), float32."""
    n, Hq, d = q.shape
    P, B, Hkv, _ = k_pages.shape
    tensors = (q, k_pages, v_pages)
    if not all(supports(t.dtype, d) and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        raise ValueError(
            f"the CPU kernel takes contiguous float32 CPU tensors with head_dim in {HEAD_DIMS}, got "
            + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors)
        )
    if v_pages.shape != k_pages.shape or k_pages.shape[-1] != d or Hq % Hkv:
        raise ValueError(
            f"need q (n, g*Hkv, d), k and v pages (P, B, Hkv, d), got {q.shape}, {k_pages.shape}"
        )
    if page_ids.dtype != torch.long or page_ids.device.type != "cpu" or not page_ids.is_contiguous():
        raise ValueError(
            f"page_ids must be contiguous int64 on the CPU, got {page_ids.dtype} {page_ids.device}"
        )
    if not 0 <= start < stop <= page_ids.shape[0] * B or (causal and stop - start < n):
        raise ValueError(
            f"slots [{start}, {stop}) must lie in the table's {page_ids.shape[0] * B}"
            + (f" and hold the {n} queries" if causal else "")
        )
    limit = stop - n + 1 if causal else stop + n  # row i sees slots < limit + i
    threads = max(1, min(threads or torch.get_num_threads(), (stop - start) // MIN_KEYS_PER_THREAD))
    out = torch.empty_like(q)
    lse = torch.empty(n, Hq)
    # fmt: off
    status = library().paged_attention(
        q.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(), P, page_ids.data_ptr(), start, stop, limit,
        n, Hq, Hkv, d, B, d**-0.5, out.data_ptr(), lse.data_ptr(), threads,
    )
    # fmt: on
    if status == 2:
        raise ValueError(f"the block table names a page outside the {P} pages")
    if status:
        raise MemoryError("the CPU attention kernel could not allocate its scratch")
    return out, lse


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) float32, contiguous CPU tensors, x float32 and the
    weight float32 or bfloat16 (widened exactly; products and sums in float32): the kernel
    for few rows (it streams the weights once; M rows each reread them from L1)."""
    tensors = (x, weight)
    if not (
        x.dtype == torch.float32
        and weight.dtype in LINEAR_WEIGHTS
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    ):
        raise ValueError(
            "the CPU kernel takes contiguous CPU tensors, x float32 and the weight float32 or bfloat16, got "
            + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors)
        )
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"need x (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N)
    kernel = getattr(library(), LINEAR_WEIGHTS[weight.dtype])
    kernel(x.data_ptr(), weight.data_ptr(), y.data_ptr(), M, N, K, torch.get_num_threads())
    return y
