"""The OpenAI-compatible HTTP API over one engine. Handlers parse, authorize and queue work;
the engine's worker thread does everything that touches tensors or sessions."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePath
from typing import Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from infinikv.engine.generator import GenerationEvent
from infinikv.engine.jobs import IngestJob
from infinikv.engine.requests import Turn, TurnResult, run_ingest, run_turn
from infinikv.engine.scheduler import Engine, Failed, Finished, TaskHandle
from infinikv.errors import InfinikvError
from infinikv.service.errors import ApiError, as_api_error, error_body, install_handlers
from infinikv.service.limits import BodySizeLimit
from infinikv.service.metrics import Metrics
from infinikv.service.schemas import (
    SESSION_ID,
    ChatCompletionRequest,
    CompletionRequest,
    DocumentText,
    GenerationRequest,
)
from infinikv.service.settings import Settings

DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".text")

SessionId = Path(pattern=SESSION_ID, max_length=64)

_DOCUMENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DocumentText.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


def create_app(engine: Engine, settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """The app; it starts the engine's worker on startup and stops it (saving sessions) on exit."""
    metrics = metrics or Metrics()
    engine.observer = metrics
    metrics.watch(
        lambda: engine.queued,
        lambda: sum(1 for s in list(engine.sessions.values()) if s.seq is not None),
        lambda: sum(
            s.seq.long_state.memory.tokens
            for s in list(engine.sessions.values())
            if s.seq is not None and s.seq.long_state is not None and s.seq.long_state.memory is not None
        ),
    )
    metrics.store_up.set_function(lambda: _store_answers(engine))
    keys = {hashlib.sha256(k.encode()).hexdigest(): k for k in settings.api_key_list}
    model_id = settings.model_id
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    # With API keys, the schema, the docs and the metrics answer only to a key (the metrics
    # to anyone if the operator says so: a scraper inside the network).
    app = FastAPI(
        title="infinikv",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None if keys else "/docs",
        redoc_url=None if keys else "/redoc",
        openapi_url=None if keys else "/openapi.json",
    )
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # noqa: ANN001, ANN202 - starlette's shape
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    def owner(request: Request) -> str:
        """The caller: a hash of its API key ("" when the server has no keys)."""
        if not keys:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(digest, d) for d in keys):
            raise ApiError(
                401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"
            )
        return digest[:32]

    def check_model(body: GenerationRequest) -> None:
        if body.model not in (None, model_id):
            raise ApiError(
                404, f"model {body.model!r} is not served here (try {model_id!r})", code="model_not_found"
            )

    async def events(handle: TaskHandle) -> AsyncIterator[GenerationEvent | TurnResult]:
        try:
            while True:
                item = await handle.next()
                if isinstance(item, Failed):
                    raise item.error
                if isinstance(item, Finished):
                    yield item.value
                    return
                if isinstance(item, GenerationEvent):
                    yield item
        finally:
            handle.cancel()  # a no-op once finished; stops the task if the client went away

    async def generate(body: GenerationRequest, turn: Turn, who: str, kind: str) -> Response:
        check_model(body)
        arrived = time.perf_counter()
        handle = engine.submit(
            run_turn(turn), TaskHandle(asyncio.get_running_loop()), turn.session_id, who, needs_sequence=True
        )
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = events(handle)
        if body.stream:
            # The first item decides the status: an unknown session is a 404, not a broken stream.
            first = await _first_token(stream)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = _sse(first, stream, kind, rid, created, model_id, include_usage, arrived, metrics)
            return StreamingResponse(
                sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        first_token: float | None = None
        result: TurnResult | None = None
        async for item in stream:
            if isinstance(item, TurnResult):
                result = item
            elif first_token is None and (item.token_id is not None or item.finish_reason):
                first_token = time.perf_counter()
        assert result is not None
        _account(metrics, result, arrived, first_token)
        return JSONResponse(_response(kind, rid, created, model_id, result))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """ok, or degraded while the block store does not answer (sessions get 503 then)."""
        try:
            await asyncio.to_thread(engine.store.ping)
            store = "ok"
        except InfinikvError as e:
            store = f"unreachable: {e}"
        status = "ok" if store == "ok" else "degraded"
        return {"status": status, "model": model_id, "queued": engine.queued, "store": store}

    async def metrics_reader(request: Request) -> None:
        if keys and not settings.public_metrics:
            owner(request)

    @app.get("/metrics", dependencies=[Depends(metrics_reader)])
    async def prometheus() -> Response:
        body = await asyncio.to_thread(metrics.render)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    if keys:

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(owner)])
        async def schema() -> dict[str, Any]:
            return app.openapi()

    @app.get("/v1/models")
    async def models(_: str = Depends(owner)) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "infinikv"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, who: str = Depends(owner)) -> Response:
        params = body.sampling(settings.default_max_tokens, settings.max_tokens_limit)
        messages = [m.as_template_message() for m in body.messages]
        return await generate(body, Turn(params, messages=messages, session_id=body.session_id), who, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, who: str = Depends(owner)) -> Response:
        params = body.sampling(settings.default_max_tokens, settings.max_tokens_limit)
        return await generate(body, Turn(params, text=body.text, session_id=body.session_id), who, "text")

    @app.post("/v1/sessions", status_code=201)
    async def create_session(who: str = Depends(owner)) -> dict[str, Any]:
        return await engine.call(lambda e: e.create_session(who).stats())  # type: ignore[no-any-return]

    @app.get("/v1/sessions")
    async def list_sessions(who: str = Depends(owner)) -> dict[str, Any]:
        found = await engine.call(lambda e: [s.stats() for s in e.list_sessions(who)])
        return {"object": "list", "data": found}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str = SessionId, who: str = Depends(owner)) -> dict[str, Any]:
        return await engine.call(lambda e: e.session(session_id, who).stats())  # type: ignore[no-any-return]

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str = SessionId, who: str = Depends(owner)) -> dict[str, Any]:
        keys_deleted = await engine.call(lambda e: e.delete_session(session_id, who), session_id, who)
        return {
            "id": session_id,
            "object": "session.deleted",
            "deleted": True,
            "store_keys_deleted": keys_deleted,
        }

    @app.post("/v1/sessions/{session_id}/documents", status_code=202, openapi_extra=_DOCUMENT_BODY)
    async def add_document(
        request: Request, session_id: str = SessionId, who: str = Depends(owner)
    ) -> dict[str, Any]:
        name, text = await _document(request)
        # An unknown session is a 404 and a document too long for it a 413 now, not in the job.
        await engine.call(lambda e: e.check_fits(session_id, who, text))
        job = IngestJob(session_id, who, name)
        handle = TaskHandle(asyncio.get_running_loop())
        engine.submit(run_ingest(job, text), handle, session_id, who, needs_sequence=True, background=True)
        engine.jobs.add(job, handle.cancel)
        asyncio.get_running_loop().create_task(_count_ingested(handle, job, metrics))
        return job.view()

    async def find_job(job_id: str, who: str) -> IngestJob:
        job = await asyncio.to_thread(engine.jobs.get, job_id)
        if job is None or job.owner != who:
            raise ApiError(404, f"job {job_id!r} not found", code="job_not_found")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str = Path(max_length=64), who: str = Depends(owner)) -> dict[str, Any]:
        return (await find_job(job_id, who)).view()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str = Path(max_length=64), who: str = Depends(owner)) -> dict[str, Any]:
        """Stop an ingestion; the session stays as it was before the job."""
        job = await find_job(job_id, who)
        if not engine.jobs.cancel(job.id):
            raise ApiError(409, f"job {job_id!r} is {job.status}, not running here", code="job_not_running")
        return job.view()

    return app


async def _first_token(
    stream: AsyncIterator[GenerationEvent | TurnResult],
) -> GenerationEvent | TurnResult:
    async for item in stream:
        if isinstance(item, TurnResult) or item.token_id is not None or item.finish_reason:
            return item
    raise AssertionError("a turn always ends with its result")


async def _sse(
    first: GenerationEvent | TurnResult,
    stream: AsyncIterator[GenerationEvent | TurnResult],
    kind: str,
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
    arrived: float,
    metrics: Metrics,
) -> AsyncIterator[str]:
    """OpenAI's chunk stream: role, content deltas, the finish reason, usage if asked, [DONE]."""
    first_token = time.perf_counter()
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None, usage: dict[str, int] | None = None) -> str:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {} if delta is None else {"content": delta}}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None}
        choice["finish_reason"] = finish
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
        body["choices"] = [] if usage is not None else [choice]
        if usage is not None or include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    if kind == "chat":
        yield f"data: {json.dumps(_role_chunk(rid, created, model, include_usage))}\n\n"
    try:
        item = first
        while True:
            if isinstance(item, TurnResult):
                _account(metrics, item, arrived, first_token)
                yield chunk(None, item.finish_reason)
                if include_usage:
                    yield chunk(None, None, _usage(item))
                break
            if item.text:
                yield chunk(item.text, None)
            item = await anext(stream)
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
        err = as_api_error(e)
        yield f"data: {json.dumps(error_body(err.message, err.kind, err.code))}\n\n"
    yield "data: [DONE]\n\n"


def _role_chunk(rid: str, created: int, model: str, include_usage: bool) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [choice]
    if include_usage:
        body["usage"] = None
    return body


def _usage(result: TurnResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _response(kind: str, rid: str, created: int, model: str, result: TurnResult) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": result.text, "logprobs": None}, "text_completion"
    choice["finish_reason"] = result.finish_reason
    extra = {} if result.speculation is None else {"speculation": result.speculation}
    return {
        **extra,
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(result),
    }


def _account(metrics: Metrics, result: TurnResult, arrived: float, first_token: float | None) -> None:
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


async def _document(request: Request) -> tuple[str, str]:
    """(name, text) of an uploaded .txt/.md file (multipart field `file`) or a JSON body."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart body needs a file field named 'file'")
        name = upload.filename or "document.txt"
        if PurePath(name).suffix.lower() not in DOCUMENT_SUFFIXES:
            raise ApiError(415, f"{name}: only {', '.join(DOCUMENT_SUFFIXES)} files are accepted")
        raw = await upload.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"{name} is not UTF-8 text: {e}") from e
        if not text.strip():
            raise ApiError(400, f"{name} is empty")
        return name, text
    if ctype.startswith("application/json"):
        try:
            doc = DocumentText.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from e
        return doc.name, doc.text
    raise ApiError(415, "send application/json {'text', 'name'} or multipart/form-data with a 'file'")


def _store_answers(engine: Engine) -> float:
    try:
        engine.store.ping()
    except InfinikvError:
        return 0.0
    return 1.0


async def _count_ingested(handle: TaskHandle, job: IngestJob, metrics: Metrics) -> None:
    while not isinstance(await handle.next(), Finished | Failed):
        pass
    metrics.ingested_tokens.inc(job.done_tokens)
