"""POST /tokenize and /detokenize (vLLM's shapes): a text or chat messages to the model's
token ids, with the context capacity; token ids back to text."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from infinikv.service.schemas import DetokenizeRequest, TokenizeRequest, check_token_ids
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
    gen = state.engine.generator
    check_token_ids(body.tokens, gen.loaded.config.vocab_size)
    return {"prompt": await asyncio.to_thread(gen.tokenizer.decode, body.tokens)}
