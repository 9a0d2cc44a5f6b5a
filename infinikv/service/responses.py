"""Engine results in OpenAI's shapes: a chat or text completion, whole or as an SSE chunk
stream, with its usage; and the metrics each finished request adds to."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from infinikv.engine.generator import GenerationEvent
from infinikv.engine.requests import TurnResult
from infinikv.service.errors import as_api_error, error_body
from infinikv.service.metrics import Metrics

Events = AsyncIterator[GenerationEvent | TurnResult]
Decode = Callable[[list[int]], str]  # token ids to text (the tokenizer's decode)


@dataclass(frozen=True)
class Shape:
    """How one kind of completion looks: its ids, object names and choices."""

    chat: bool

    @property
    def id_prefix(self) -> str:
        return "chatcmpl" if self.chat else "cmpl"

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def choice(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
        return {"index": index, "text": text, "logprobs": logprobs}

    def delta(self, text: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": {} if text is None else {"content": text}}
        return {"index": 0, "text": text or "", "logprobs": None}


CHAT, TEXT = Shape(chat=True), Shape(chat=False)


@dataclass(frozen=True)
class Reply:
    """One completion request being answered."""

    shape: Shape
    id: str
    created: int
    model: str
    arrived: float  # perf_counter() when the request arrived
    citations: bool = False  # each choice carries its citations (the stream: its last chunk)

    def cited(self, result: TurnResult) -> dict[str, Any]:
        return {"citations": [dataclasses.asdict(c) for c in result.citations]} if self.citations else {}

    def header(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(results: list[TurnResult]) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: the prompt tokens whose keys came from the prefix cache."""
    prompt = sum(r.prompt_tokens for r in results)
    generated = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion(
    reply: Reply, results: list[TurnResult], decode: Decode, echoes: list[str] | None = None
) -> dict[str, Any]:
    """The whole answer: a choice per result (`echoes`: the prompts repeated before them)."""
    choices = []
    for i, result in enumerate(results):
        echo = echoes[i] if echoes is not None else ""
        logprobs = None
        if result.logprobs or result.prompt_logprobs:
            logprobs = chat_logprobs(result, decode) if reply.shape.chat else text_logprobs(result, decode)
        choice = reply.shape.choice(i, echo + result.text, logprobs)
        choices.append({**choice, "finish_reason": result.finish_reason, **reply.cited(result)})
    drafted = results[0].speculation if len(results) == 1 else None
    extra = {} if drafted is None else {"speculation": drafted}
    return {**extra, **reply.header(reply.shape.object), "choices": choices, "usage": usage(results)}


def text_logprobs(result: TurnResult, decode: Decode) -> dict[str, Any]:
    """The legacy completions shape, over the echoed prompt's tokens (the first without a
    log-probability) and the generated ones; offsets count characters of the choice's text."""
    entries = [*zip(result.prompt_ids, result.prompt_logprobs, strict=False)]
    entries += [(lp.token, lp) for lp in result.logprobs]
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for token, lp in entries:
        piece = decode([token])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {decode([t]): v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(result: TurnResult, decode: Decode) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        piece = decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    content = [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in result.logprobs
    ]
    return {"content": content}


async def collect(events: Events) -> tuple[TurnResult, float | None]:
    """A turn's result and when its first token came (perf_counter), from its events."""
    first_token: float | None = None
    async for item in events:
        if isinstance(item, TurnResult):
            return item, first_token
        if first_token is None and (item.token_id is not None or item.finish_reason):
            first_token = time.perf_counter()
    raise AssertionError("a turn always ends with its result")


async def first_event(events: Events) -> GenerationEvent | TurnResult:
    """The first event with a token (or the result): what decides a stream's status."""
    async for item in events:
        if isinstance(item, TurnResult) or item.token_id is not None or item.finish_reason:
            return item
    raise AssertionError("a turn always ends with its result")


async def sse(
    reply: Reply,
    first: GenerationEvent | TurnResult,
    events: Events,
    include_usage: bool,
    metrics: Metrics,
) -> AsyncIterator[str]:
    """OpenAI's chunk stream: role, content deltas, the finish reason, usage if asked, [DONE]."""
    first_token = time.perf_counter()
    shape = reply.shape

    def chunk(
        delta: str | None, finish: str | None, counts: dict[str, int] | None = None, **extra: Any
    ) -> str:
        body: dict[str, Any] = reply.header(shape.chunk_object)
        body["choices"] = (
            [] if counts is not None else [{**shape.delta(delta), "finish_reason": finish, **extra}]
        )
        if counts is not None or include_usage:
            body["usage"] = counts
        return f"data: {json.dumps(body)}\n\n"

    if shape.chat:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        opening: dict[str, Any] = {**reply.header(shape.chunk_object), "choices": [role]}
        if include_usage:
            opening["usage"] = None
        yield f"data: {json.dumps(opening)}\n\n"
    try:
        item = first
        while True:
            if isinstance(item, TurnResult):
                account(metrics, item, reply.arrived, first_token)
                yield chunk(None, item.finish_reason, **reply.cited(item))
                if include_usage:
                    yield chunk(None, None, usage([item]))
                break
            if item.text:
                yield chunk(item.text, None)
            item = await anext(events)
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
        err = as_api_error(e)
        yield f"data: {json.dumps(error_body(err.message, err.kind, err.code))}\n\n"
    yield "data: [DONE]\n\n"


def account(metrics: Metrics, result: TurnResult, arrived: float, first_token: float | None) -> None:
    now = time.perf_counter()
    first_token = first_token or now
    metrics.prompt_tokens.inc(result.prompt_tokens)
    metrics.generated_tokens.inc(result.completion_tokens)
    metrics.ttft.observe(first_token - arrived)
    if result.speculation is not None:
        metrics.drafted_tokens.inc(result.speculation["drafted"])
        metrics.accepted_tokens.inc(result.speculation["accepted"])
    if result.completion_tokens > 1 and now > first_token:
        metrics.decode_rate.observe((result.completion_tokens - 1) / (now - first_token))
