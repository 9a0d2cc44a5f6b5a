"""GET /v1/models: the one model this server serves, with its context: the longest
sequence it holds (`max_model_len`), the length it was trained to, and the long-context
settings that extend it."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends

from infinikv.service.state import Server, caller

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(caller)])
async def models(state: Server) -> dict[str, Any]:
    gen = state.engine.generator
    long_context = None if gen.long_context is None else dataclasses.asdict(gen.long_context)
    model = {
        "id": state.model_id,
        "object": "model",
        "created": state.started,
        "owned_by": "infinikv",
        "max_model_len": gen.capacity,
        "trained_context_length": gen.loaded.config.max_position_embeddings,
        "long_context": long_context,
    }
    return {"object": "list", "data": [model]}
