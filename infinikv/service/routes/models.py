"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from infinikv.service.state import Server, caller

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(caller)])
async def models(state: Server) -> dict[str, Any]:
    model = {"id": state.model_id, "object": "model", "created": state.started, "owned_by": "infinikv"}
    return {"object": "list", "data": [model]}
