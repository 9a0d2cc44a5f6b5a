"""Build the model, generator and engine that a front end (CLI, Python API, HTTP server)
drives, from Settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from infinikv.attention.backends import causal_attention, long_context_attention, resolve_backend
from infinikv.cache.pages import PagePool
from infinikv.engine.generator import Generator
from infinikv.engine.scheduler import Engine
from infinikv.engine.speculative.draft_model import DraftModelDrafter, check_same_vocabulary
from infinikv.engine.speculative.drafter import Drafter
from infinikv.engine.speculative.lookup import LookupDrafter
from infinikv.engine.speculative.self_draft import SelfDrafter
from infinikv.memory.index import gpu_resources
from infinikv.memory.store import InProcessBlockStore, open_store
from infinikv.model.linear import few_row_kernels
from infinikv.model.loader import LoadedModel, load_model
from infinikv.service.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings, slots: int | None = None) -> Engine:
    """The engine every front end drives (not started): the model, its generator with
    `slots` sequences (default: the setting), and the sessions' store. An unreachable Redis
    fails here, before the model loads."""
    store = open_store(settings.redis_url, settings.redis_cluster)
    generator = build_generator(settings, slots=settings.slots if slots is None else slots)
    warn_if_pool_exceeds(generator.pool, physical_ram())
    return Engine(
        generator,
        store,
        max_queue=settings.max_queue,
        lease_seconds=settings.lease_seconds,
        lease_wait=settings.lease_wait,
        step_tokens=settings.step_tokens,
        max_batch=settings.max_batch,
    )


def physical_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def warn_if_pool_exceeds(pool: PagePool, ram: int) -> None:
    """Pages are touched as sequences fill them, so a pool larger than the RAM starts; warn that
    full slots would not fit."""
    if pool.nbytes > ram:
        log.warning(
            "the KV pool grows to %.1f GB when every slot is full, more than this machine's %.1f GB "
            "of RAM: lower --slots (or --resident), or keep the pages in bfloat16 (--kv-dtype bfloat16), "
            "if many long sequences run at once",
            pool.nbytes / 1e9,
            ram / 1e9,
        )


def build_generator(settings: Settings, slots: int = 1) -> Generator:
    """Model + generator from settings. Its sequences (stateless generations) evict into a
    store of this process: sessions, the only state that outlives it, use the engine's."""
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
    attach_kernels(loaded, settings.attention_backend)
    long_context = settings.long_context_config(loaded.config.max_position_embeddings)
    if long_context is not None and long_context.memory:
        gpu_resources(loaded.model.device)  # decides (and logs) where the FAISS indexes live
    return Generator(
        loaded,
        drafter_factory=_drafter_factory(settings, loaded),
        max_draft=settings.num_draft,
        max_seq_len=settings.max_seq_len,
        page_size=settings.page_size,
        chunk_size=settings.chunk_size,
        long_context=long_context,
        store=InProcessBlockStore(),
        slots=slots,
        prefix_cache=settings.prefix_cache,
        kv_dtype=settings.torch_kv_dtype,
    )


def attach_kernels(loaded: LoadedModel, backend: str) -> None:
    """Give the model the kernels of the backend named in the settings, resolved for it."""
    model = loaded.model
    resolved = resolve_backend(backend, model.device, model.dtype, loaded.config.head_dim)
    model.attention = causal_attention(resolved)
    model.long_context_attention = long_context_attention(resolved)
    model.use_few_rows(few_row_kernels(resolved))


def _drafter_factory(settings: Settings, target: LoadedModel) -> Callable[[], Drafter] | None:
    """What drafts tokens for each generation (None: no speculation), loaded once here."""
    draft = settings.draft or ("model" if settings.draft_model else None)
    if draft is None:
        return None
    if draft == "lookup":
        return LookupDrafter
    if draft.startswith("self:"):
        layers = int(draft.removeprefix("self:"))
        SelfDrafter(target.model, layers)  # refuse a bad layer count now, not per request
        return lambda: SelfDrafter(target.model, layers)
    spec = settings.draft_model or settings.model  # the default model drafts for itself if unset
    small = load_model(spec, settings.cache_dir, torch.float32, settings.device, settings.draft_quantize)
    check_same_vocabulary(small, target)
    attach_kernels(small, settings.attention_backend)
    log.info("draft model %s (quantize=%s)", small.path, settings.draft_quantize)
    page, chunk = settings.page_size, settings.chunk_size
    return lambda: DraftModelDrafter(small.model, page_size=page, chunk_size=chunk)
