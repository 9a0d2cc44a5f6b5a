"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, and the mapping
from engine errors to HTTP statuses. A bad request never takes the server down."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from infinikv.engine.tasks import EngineOverloadedError, EngineStoppedError
from infinikv.errors import (
    CapacityError,
    InfinikvError,
    LeaseLostError,
    SessionBusyError,
    SessionNotFoundError,
    UnsupportedDocumentError,
)
from infinikv.memory.index import CorruptSnapshotError
from infinikv.memory.store import StoreUnavailableError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.retry_after = retry_after


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def as_api_error(e: BaseException) -> ApiError:
    """The HTTP status and OpenAI error type for an exception raised by the engine."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, SessionNotFoundError):
        return ApiError(404, str(e), code="session_not_found")
    if isinstance(e, SessionBusyError):
        return ApiError(409, str(e), code="session_busy", retry_after=e.retry_after)
    if isinstance(e, LeaseLostError):
        return ApiError(409, str(e), code="session_taken_over", retry_after=1)
    if isinstance(e, UnsupportedDocumentError):
        return ApiError(415, str(e), code="unsupported_document")
    if isinstance(e, CapacityError):
        return ApiError(413, str(e), code="context_length_exceeded")
    if isinstance(e, EngineOverloadedError):
        return ApiError(429, str(e), kind="rate_limit_error", code="queue_full")
    if isinstance(e, EngineStoppedError | StoreUnavailableError):
        return ApiError(503, str(e), kind="server_error", code="unavailable")
    if isinstance(e, CorruptSnapshotError):
        return ApiError(500, str(e), kind="server_error", code="corrupt_snapshot")
    if isinstance(e, InfinikvError | ValueError):
        return ApiError(400, str(e))
    log.error("internal error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")


def install_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, e: Exception) -> JSONResponse:
        err = as_api_error(e)
        headers = None if err.retry_after is None else {"Retry-After": str(max(1, round(err.retry_after)))}
        return JSONResponse(error_body(err.message, err.kind, err.code), err.status, headers)

    async def validation(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON", "invalid_request_error"), 400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_value", param), status_code=400
        )

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for cls in (ApiError, InfinikvError, ValueError, Exception):
        app.add_exception_handler(cls, api_error)
