"""Build the model and generator that a front end (CLI, HTTP server) drives, from Settings."""

from __future__ import annotations

import logging

import torch

from infinikv.engine.generator import Generator
from infinikv.memory.store import open_store
from infinikv.model.loader import load_model
from infinikv.service.settings import Settings

log = logging.getLogger(__name__)


def build_generator(settings: Settings, slots: int = 1) -> Generator:
    """Model + generator from settings; an unreachable Redis fails here, before the model loads."""
    store = open_store(settings.redis_url, settings.redis_cluster)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    loaded = load_model(
        settings.model, settings.cache_dir, settings.torch_dtype, settings.device, settings.quantize
    )
    log.info(
        "loaded %s (%s, quantize=%s) from %s",
        loaded.config.model_type,
        settings.dtype,
        settings.quantize,
        loaded.path,
    )
    return Generator(
        loaded,
        max_seq_len=settings.max_seq_len,
        page_size=settings.page_size,
        chunk_size=settings.chunk_size,
        long_context=settings.long_context_config(loaded.config.max_position_embeddings),
        store=store,
        slots=slots,
    )
