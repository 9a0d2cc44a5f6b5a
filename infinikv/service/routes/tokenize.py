"""POST /tokenize and /detokenize (vLLM's shapes): a text or chat messages to the model's
token ids, with the context capacity; token ids back to text."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from infinikv.service.errors import ApiError
from infinikv.service.schemas import DetokenizeRequest, TokenizeRequest
from infinikv.service.state import Server, caller

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(caller)])
async def tokenize(body: TokenizeRequest, state: Server) -> dict[str, Any]:
    gen = state.engine.generator
    if body.messages is not None:
        messages = [m.as_template_message() for m in body.messages]
        ids = await asyncio.to_thread(gen.encode_chat, messages)
    else:
        ids = await asyncio.to_thread(gen.encode, body.prompt or "", body.add_special_tokens)
    return {"count": len(ids), "max_model_len": gen.capacity, "tokens": ids}


@router.post("/detokenize", dependencies=[Depends(caller)])
async def detokenize(body: DetokenizeRequest, state: Server) -> dict[str, Any]:
    tokenizer = state.engine.generator.tokenizer
    vocab = len(tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})")
    return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}
