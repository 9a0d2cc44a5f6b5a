"""GET /health (ok, or degraded while the block store does not answer) and GET /metrics
(Prometheus; behind a key when the server has keys, unless made public)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse

from infinikv.errors import InfinikvError
from infinikv.service.state import Server, metrics_reader

router = APIRouter()


@router.get("/health")
async def health(state: Server) -> dict[str, Any]:
    engine = state.engine
    try:
        await asyncio.to_thread(engine.store.ping)
        store = "ok"
    except InfinikvError as e:
        store = f"unreachable: {e}"
    status = "ok" if store == "ok" else "degraded"
    return {"status": status, "model": state.model_id, "queued": engine.queued, "store": store}


@router.get("/metrics", dependencies=[Depends(metrics_reader)])
async def prometheus(state: Server) -> Response:
    body = await asyncio.to_thread(state.metrics.render)
    return PlainTextResponse(body, media_type="text/plain; version=0.0.4")
