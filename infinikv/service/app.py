"""The OpenAI-compatible HTTP API over one engine: the app, its middleware and error
handlers, and the routers of `routes/`. Handlers parse, authorize and queue work; the
engine's worker thread does everything that touches tensors or sessions."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request

from infinikv.engine.scheduler import Engine
from infinikv.errors import InfinikvError
from infinikv.service.errors import install_handlers
from infinikv.service.limits import BodySizeLimit
from infinikv.service.metrics import Metrics
from infinikv.service.routes import completions, health, jobs, models, sessions, tokenize
from infinikv.service.settings import Settings
from infinikv.service.state import ServerState, caller


def create_app(engine: Engine, settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """The app; it starts the engine's worker on startup and stops it (saving sessions) on exit."""
    metrics = metrics or Metrics()
    engine.observer = metrics
    metrics.watch(
        lambda: engine.queued,
        lambda: engine.sessions.in_pages,
        lambda: engine.sessions.memory_tokens,
        lambda: _store_answers(engine),
        lambda: _prefix_cache(engine),
    )
    keys = {hashlib.sha256(k.encode()).hexdigest() for k in settings.api_key_list}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    # With API keys, the schema and the docs answer only to a key (the docs not at all).
    app = FastAPI(
        title="infinikv",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None if keys else "/docs",
        redoc_url=None if keys else "/redoc",
        openapi_url=None if keys else "/openapi.json",
    )
    app.state.server = ServerState(engine, settings, metrics, int(time.time()), keys)
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # noqa: ANN001, ANN202 - starlette's shape
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    for module in (health, models, completions, sessions, jobs, tokenize):
        app.include_router(module.router)
    if keys:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(caller)])
        async def schema() -> dict[str, Any]:
            return app.openapi()

    return app


def _store_answers(engine: Engine) -> float:
    try:
        engine.store.ping()
    except InfinikvError:
        return 0.0
    return 1.0


def _prefix_cache(engine: Engine) -> tuple[int, int]:
    """The prefix cache's pages and hit tokens ((0, 0) without one)."""
    cache = engine.generator.prefix_cache
    return (0, 0) if cache is None else (len(cache), cache.hit_tokens)
