"""The Python face of the key sketch's logit kernel (sketch.c): shape checks, one ctypes call.
Kept apart from ops.py so that the memory layer, which the attention layer imports, can call
it without importing the attention layer back."""

from __future__ import annotations

import torch

from infinikv.kernels.cpu.build import library


def sketch_logits(table: torch.Tensor, chunks: int, tokens: int, queries: torch.Tensor) -> torch.Tensor:
    """Approximate logits of queries (H, m, d) float32 over every channel of the first `chunks`
    chunks of one layer's sketch segment, table (chunks held, H * d, C + 8) uint8 (rows of C
    uint8 steps, then float32 step and minimum). Returns (H, m, tokens) float32, tokens <=
    chunks * C."""
    H, m, d = queries.shape
    held, rows, width = table.shape
    C = width - 8
    if table.dtype != torch.uint8 or queries.dtype != torch.float32:
        raise ValueError(f"need a uint8 table and float32 queries, got {table.dtype} and {queries.dtype}")
    if not (table.device.type == queries.device.type == "cpu" and table.is_contiguous()):
        raise ValueError("the sketch kernel takes a contiguous CPU table and CPU queries")
    if rows != H * d or C % 64 or d > 128 or not 0 < chunks <= held or not 0 < tokens <= chunks * C:
        raise ValueError(
            f"need table (chunks >= {chunks}, H * d = {H * d}, C + 8), C a multiple of 64, d <= 128, holding "
            f"{tokens} tokens, got {tuple(table.shape)}"
        )
    queries = queries.contiguous()
    out = torch.empty(H, m, tokens)
    library().sketch_logits(
        table.data_ptr(),
        chunks,
        H,
        d,
        C,
        tokens,
        queries.data_ptr(),
        m,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
