"""`infinikv serve`: model, engine and HTTP API in one process, served by uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from infinikv.service.app import create_app
from infinikv.service.runtime import build_engine
from infinikv.service.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Blocks until the server is stopped (SIGINT/SIGTERM); loaded sessions are committed on the
    way out. An unreachable Redis fails here, before the model loads."""
    engine = build_engine(settings)
    app = create_app(engine, settings)
    log.info("serving %s on http://%s:%d", settings.model_id, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)
