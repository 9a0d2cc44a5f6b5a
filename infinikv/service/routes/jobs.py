"""GET and DELETE /v1/jobs/{id}: an ingestion's progress, from any replica (the store keeps
every job's record), and its cancellation on the replica running it."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path

from infinikv.engine.jobs import IngestJob
from infinikv.service.errors import ApiError
from infinikv.service.state import Caller, Server, ServerState

router = APIRouter()

JobId = Annotated[str, Path(max_length=64)]


def job_body(job: IngestJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "ingestion_job",
        "session_id": job.session_id,
        "document_id": job.document_id,
        "name": job.name,
        "status": job.status,
        "total_tokens": job.total_tokens,
        "done_tokens": job.done_tokens,
        "progress": job.done_tokens / job.total_tokens if job.total_tokens else 0.0,
        "tokens_per_second": _rounded(job.tokens_per_second),
        "eta_seconds": _rounded(job.eta_seconds),
        "error": job.error,
        "created": int(job.created),
        "finished": int(job.finished) if job.finished else None,
    }


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


async def find_job(state: ServerState, job_id: str, who: str) -> IngestJob:
    job = await asyncio.to_thread(state.engine.jobs.get, job_id)
    if job is None or job.owner != who:
        raise ApiError(404, f"job {job_id!r} not found", code="job_not_found")
    return job


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: JobId, who: Caller, state: Server) -> dict[str, Any]:
    return job_body(await find_job(state, job_id, who))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: JobId, who: Caller, state: Server) -> dict[str, Any]:
    """Stop an ingestion; the session stays as it was before the job."""
    job = await find_job(state, job_id, who)
    if not state.engine.jobs.cancel(job.id):
        raise ApiError(409, f"job {job_id!r} is {job.status}, not running here", code="job_not_running")
    return job_body(job)
