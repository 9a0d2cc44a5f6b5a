"""Which attention implementation runs: the plain-PyTorch path (any device; the reference),
the C kernels of `infinikv.kernels.cpu` (CPU, float32: decode steps and draft
verifications, their attention, their float32 or bfloat16-weight projections and the norms
and MLP around them) or the Triton kernels of `infinikv.kernels` (CUDA). Chosen by name
from the settings."""

from __future__ import annotations

import importlib.util
import logging

import torch

from infinikv.attention.interface import AttentionBackend, LongContextAttentionBackend
from infinikv.attention.pytorch import paged_causal_attention, paged_long_context_attention
from infinikv.errors import KernelBuildError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu", "triton")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """ "auto" -> "triton" on CUDA when Triton is installed; on the CPU "cpu" when the model
    suits the C kernels and they build, else "torch". An explicit choice the model or the
    machine cannot run is refused with the reason. Logs the choice."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = _auto(device, dtype, head_dim)
    elif name == "triton":
        if device.type != "cuda":
            raise ValueError(f"the triton attention backend needs a CUDA device, the model is on {device}")
        if importlib.util.find_spec("triton") is None:
            raise ValueError(
                "the triton attention backend needs the triton package: pip install 'infinikv[gpu]'"
            )
    elif name == "cpu":
        reason = _cpu_unfit(device, dtype, head_dim)
        if reason:
            raise ValueError(f"the cpu attention backend {reason}")
    log.info("attention backend: %s (device %s)", name, device)
    return name


def _auto(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    if device.type == "cuda":
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    reason = _cpu_unfit(device, dtype, head_dim)
    if reason:
        log.info("cpu attention kernels not used: the backend %s", reason)
        return "torch"
    return "cpu"


def _cpu_unfit(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the C kernels cannot run this model here, or None."""
    from infinikv.kernels.cpu.build import library
    from infinikv.kernels.cpu.ops import HEAD_DIMS

    if device.type != "cpu":
        return f"runs on the CPU, the model is on {device}"
    if dtype != torch.float32 or head_dim not in HEAD_DIMS:
        return f"takes float32 models with head_dim in {HEAD_DIMS}, got {dtype} and {head_dim}"
    try:
        library()
    except KernelBuildError as e:
        return f"could not be built: {e}"
    return None


def causal_attention(backend: str) -> AttentionBackend:
    """The plain causal attention (no long-context regions) of a resolved backend."""
    if backend == "triton":
        from infinikv.attention.triton import triton_causal_attention

        return triton_causal_attention
    if backend == "cpu":
        from infinikv.attention.cpu import cpu_causal_attention

        return cpu_causal_attention
    return paged_causal_attention


def long_context_attention(backend: str) -> LongContextAttentionBackend:
    """The long-context attention (regions plus memory) of a resolved backend."""
    if backend == "triton":
        from infinikv.attention.triton import triton_long_context_attention

        return triton_long_context_attention
    if backend == "cpu":
        from infinikv.attention.cpu import cpu_long_context_attention

        return cpu_long_context_attention
    return paged_long_context_attention
