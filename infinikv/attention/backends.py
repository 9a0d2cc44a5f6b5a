"""Which attention implementation runs: the plain-PyTorch path (any device; the reference)
or the Triton kernels of `infinikv.kernels` (CUDA). Chosen by name from the settings."""

from __future__ import annotations

import importlib.util
import logging

import torch

from infinikv.attention.backend import AttentionBackend, LongContextAttentionBackend
from infinikv.attention.long_context import paged_long_context_attention
from infinikv.attention.paged_torch import paged_causal_attention

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """ "auto" -> "triton" on CUDA when Triton is installed, else "torch"; "triton" elsewhere
    is refused with the reason. Logs the choice."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        name = "triton" if device.type == "cuda" and has_triton else "torch"
    elif name == "triton" and device.type != "cuda":
        raise ValueError(f"the triton attention backend needs a CUDA device, the model is on {device}")
    elif name == "triton" and not has_triton:
        raise ValueError("the triton attention backend needs the triton package: pip install 'infinikv[gpu]'")
    log.info("attention backend: %s (device %s)", name, device)
    return name


def causal_attention(backend: str) -> AttentionBackend:
    """The plain causal attention (no long-context regions) of a resolved backend."""
    if backend == "triton":
        from infinikv.attention.long_context_triton import triton_causal_attention

        return triton_causal_attention
    return paged_causal_attention


def long_context_attention(backend: str) -> LongContextAttentionBackend:
    """The long-context attention (regions plus memory) of a resolved backend."""
    if backend == "triton":
        from infinikv.attention.long_context_triton import triton_long_context_attention

        return triton_long_context_attention
    return paged_long_context_attention
