"""POST /v1/chat/completions and /v1/completions: a turn queued to the engine (stateless or
in a session), answered whole or streamed."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse

from infinikv.engine.requests import Turn, TurnResult, submit_turn, unwrap
from infinikv.engine.tasks import TaskHandle
from infinikv.service.errors import ApiError
from infinikv.service.responses import (
    CHAT,
    TEXT,
    Events,
    Reply,
    Shape,
    account,
    collect,
    completion,
    first_event,
    sse,
)
from infinikv.service.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from infinikv.service.state import Caller, Server, ServerState

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, who: Caller, state: Server) -> Response:
    params = body.sampling(state.settings.default_max_tokens, state.settings.max_tokens_limit)
    messages = [m.as_template_message() for m in body.messages]
    return await answer(state, body, Turn(params, messages=messages, session_id=body.session_id), who, CHAT)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, who: Caller, state: Server) -> Response:
    params = body.sampling(state.settings.default_max_tokens, state.settings.max_tokens_limit)
    return await answer(state, body, Turn(params, text=body.text, session_id=body.session_id), who, TEXT)


async def answer(state: ServerState, body: GenerationRequest, turn: Turn, who: str, shape: Shape) -> Response:
    if body.model not in (None, state.model_id):
        raise ApiError(
            404, f"model {body.model!r} is not served here (try {state.model_id!r})", code="model_not_found"
        )
    reply = Reply(
        shape, f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time()), state.model_id, time.perf_counter()
    )
    handle = submit_turn(state.engine, turn, TaskHandle(asyncio.get_running_loop()), who)
    stream = events(handle)
    if body.stream:
        # The first event decides the status: an unknown session is a 404, not a broken stream.
        first = await first_event(stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = sse(reply, first, stream, include_usage, state.metrics)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    result, first_token = await collect(stream)
    account(state.metrics, result, reply.arrived, first_token)
    return JSONResponse(completion(reply, result))


async def events(handle: TaskHandle) -> Events:
    """A turn task's generation events, then its result; its error raised."""
    try:
        while not isinstance(item := unwrap(await handle.next()), TurnResult):
            yield item
        yield item
    finally:
        handle.cancel()  # a no-op once finished; stops the task if the client went away
