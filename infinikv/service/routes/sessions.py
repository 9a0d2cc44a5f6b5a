"""Sessions (create, list, read, delete) and the documents ingested into them: an upload is
checked now (404, 413) and prefilled by a background job (202)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError

from infinikv.documents import Document, read_document
from infinikv.engine.jobs import IngestJob
from infinikv.engine.requests import submit_ingest
from infinikv.engine.session import SessionStats
from infinikv.engine.tasks import Failed, Finished, TaskHandle
from infinikv.service.errors import ApiError
from infinikv.service.metrics import Metrics
from infinikv.service.routes.jobs import job_body
from infinikv.service.schemas import SESSION_ID, DocumentText
from infinikv.service.state import Caller, Server

router = APIRouter()

SessionId = Annotated[str, Path(pattern=SESSION_ID, max_length=64)]
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


def session_body(stats: SessionStats) -> dict[str, Any]:
    return {"object": "session", **dataclasses.asdict(stats)}


@router.post("/v1/sessions", status_code=201)
async def create_session(who: Caller, state: Server) -> dict[str, Any]:
    return session_body(await state.engine.call(lambda e: e.sessions.create(who).stats()))


@router.get("/v1/sessions")
async def list_sessions(who: Caller, state: Server) -> dict[str, Any]:
    found = await state.engine.call(lambda e: [s.stats() for s in e.sessions.owned_by(who)])
    return {"object": "list", "data": [session_body(s) for s in found]}


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: SessionId, who: Caller, state: Server) -> dict[str, Any]:
    return session_body(await state.engine.call(lambda e: e.sessions.get(session_id, who).stats()))


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: SessionId, who: Caller, state: Server) -> dict[str, Any]:
    deleted = await state.engine.call(lambda e: e.sessions.delete(session_id, who), session_id, who)
    return {"id": session_id, "object": "session.deleted", "deleted": True, "store_keys_deleted": deleted}


@router.post("/v1/sessions/{session_id}/documents", status_code=202, openapi_extra=_DOCUMENT_BODY)
async def add_document(
    request: Request,
    session_id: SessionId,
    who: Caller,
    state: Server,
) -> dict[str, Any]:
    doc = await document(request)
    engine = state.engine
    # An unknown session is a 404 and a document too long for it a 413 now, not in the job.
    await engine.call(lambda e: e.sessions.check_fits(session_id, who, doc.text))
    job = IngestJob(session_id, who, doc.name)
    handle = TaskHandle(asyncio.get_running_loop())
    await asyncio.to_thread(submit_ingest, engine, job, doc, handle)
    asyncio.get_running_loop().create_task(_count_ingested(handle, job, state.metrics))
    return job_body(job)


async def document(request: Request) -> Document:
    """An uploaded file (multipart field `file`: text, Markdown, HTML, EPUB or PDF, read by its
    suffix) or a JSON body's text."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart body needs a file field named 'file'")
        raw = await upload.read()
        # Parsing a book's PDF takes seconds: off the event loop, which serves other requests.
        return await asyncio.to_thread(read_document, upload.filename or "document.txt", raw)
    if ctype.startswith("application/json"):
        try:
            doc = DocumentText.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from e
        return Document(doc.name, doc.text)
    raise ApiError(415, "send application/json {'text', 'name'} or multipart/form-data with a 'file'")


async def _count_ingested(handle: TaskHandle, job: IngestJob, metrics: Metrics) -> None:
    while not isinstance(await handle.next(), Finished | Failed):
        pass
    metrics.ingested_tokens.inc(job.done_tokens)
