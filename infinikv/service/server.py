"""`infinikv serve`: model, engine and HTTP API in one process, served by uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from infinikv.engine.scheduler import Engine
from infinikv.memory.store import open_store
from infinikv.service.app import create_app
from infinikv.service.runtime import build_generator
from infinikv.service.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Blocks until the server is stopped (SIGINT/SIGTERM); loaded sessions are committed on the
    way out. An unreachable Redis fails here, before the model loads."""
    store = open_store(settings.redis_url, settings.redis_cluster)
    generator = build_generator(settings, slots=settings.slots)
    engine = Engine(
        generator,
        store,
        max_queue=settings.max_queue,
        lease_seconds=settings.lease_seconds,
        lease_wait=settings.lease_wait,
        step_tokens=settings.step_tokens,
        max_batch=settings.max_batch,
    )
    app = create_app(engine, settings)
    log.info("serving %s on http://%s:%d", settings.model_id, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)
