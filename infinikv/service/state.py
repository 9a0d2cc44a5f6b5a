"""What the routes share, kept on the app (`app.state.server`), and the dependencies that
read it: the engine, the settings, the metrics, and who the caller is."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from infinikv.engine.scheduler import Engine
from infinikv.service.errors import ApiError
from infinikv.service.metrics import Metrics
from infinikv.service.settings import Settings


@dataclass
class ServerState:
    engine: Engine
    settings: Settings
    metrics: Metrics
    started: int
    keys: set[str] = field(default_factory=set)  # sha256 digests of the API keys

    @property
    def model_id(self) -> str:
        return self.settings.model_id


def server(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


Server = Annotated[ServerState, Depends(server)]


def caller(request: Request, state: Server) -> str:
    """The caller: a hash of its API key ("" when the server has no keys)."""
    if not state.keys:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(digest, d) for d in state.keys):
        raise ApiError(
            401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"
        )
    return digest[:32]


Caller = Annotated[str, Depends(caller)]


def metrics_reader(request: Request, state: Server) -> None:
    """With API keys, /metrics needs one unless the operator made it public (a scraper)."""
    if state.keys and not state.settings.public_metrics:
        caller(request, state)
