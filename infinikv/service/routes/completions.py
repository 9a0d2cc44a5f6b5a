"""POST /v1/chat/completions and /v1/completions: a turn queued to the engine (stateless or
in a session), answered whole or streamed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse

from infinikv.engine.requests import Turn, TurnResult, submit_turn, unwrap
from infinikv.engine.sampling import SamplingParams
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
from infinikv.service.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    check_token_ids,
)
from infinikv.service.state import Caller, Server, ServerState

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, who: Caller, state: Server) -> Response:
    messages = [m.as_template_message() for m in body.messages]
    turns = [Turn(p, messages=messages, session_id=body.session_id) for p in choices(body, state)]
    return await answer(state, body, turns, who, CHAT)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, who: Caller, state: Server) -> Response:
    vocab = state.engine.generator.loaded.config.vocab_size
    each = choices(body, state)
    turns = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            turns += [Turn(params, text=prompt, session_id=body.session_id) for params in each]
        else:
            check_token_ids(prompt, vocab)
            turns += [Turn(params, token_ids=prompt) for params in each]
    return await answer(state, body, turns, who, TEXT)


def choices(body: GenerationRequest, state: ServerState) -> list[SamplingParams]:
    """The parameters of each of the request's n choices: with a seed, choice i draws with
    seed + i (reproducible, and not n copies of one draw)."""
    settings = state.settings
    vocab = state.engine.generator.loaded.config.vocab_size
    params = body.sampling(settings.default_max_tokens, settings.max_tokens_limit, vocab)
    if params.seed is None or body.n == 1:
        return [params] * body.n
    return [dataclasses.replace(params, seed=(params.seed + i) % 2**64) for i in range(body.n)]


async def answer(
    state: ServerState, body: GenerationRequest, turns: list[Turn], who: str, shape: Shape
) -> Response:
    """Queue the turns (one choice each; more than one only without stream) and answer."""
    if body.model not in (None, state.model_id):
        raise ApiError(
            404, f"model {body.model!r} is not served here (try {state.model_id!r})", code="model_not_found"
        )
    reply = Reply(
        shape,
        f"{shape.id_prefix}-{uuid.uuid4().hex}",
        int(time.time()),
        state.model_id,
        time.perf_counter(),
        body.citations,
    )
    loop = asyncio.get_running_loop()
    handles: list[TaskHandle] = []
    try:
        for turn in turns:
            handles.append(submit_turn(state.engine, turn, TaskHandle(loop), who))
    except Exception:
        for handle in handles:
            handle.cancel()
        raise
    if body.stream:
        stream = events(handles[0])
        # The first event decides the status: an unknown session is a 404, not a broken stream.
        first = await first_event(stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = sse(reply, first, stream, include_usage, state.metrics)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    try:
        collected = await asyncio.gather(*(collect(events(h)) for h in handles))
    except BaseException:  # one choice failed: the others stop too
        for handle in handles:
            handle.cancel()
        raise
    for result, first_token in collected:
        account(state.metrics, result, reply.arrived, first_token)
    echoes = [_echo(turn, state) for turn in turns] if body.echoed else None
    decode = state.engine.generator.tokenizer.decode
    return JSONResponse(completion(reply, [r for r, _ in collected], decode, echoes))


def _echo(turn: Turn, state: ServerState) -> str:
    """The prompt text a choice repeats before its completion (`echo`)."""
    if turn.text is not None:
        return turn.text
    return str(state.engine.generator.tokenizer.decode(turn.token_ids or []))


async def events(handle: TaskHandle) -> Events:
    """A turn task's generation events, then its result; its error raised."""
    try:
        while not isinstance(item := unwrap(await handle.next()), TurnResult):
            yield item
        yield item
    finally:
        handle.cancel()  # a no-op once finished; stops the task if the client went away
