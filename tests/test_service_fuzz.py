"""Property-based fuzzing of the OpenAPI schema (schemathesis) against a real server process:
whatever a client sends, the answer is never a 5xx."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from .server_process import infinikv_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    # Tiny generations and bodies keep every generated case cheap; the smallest RAM budget
    # these settings accept holds a session to 1536 tokens.
    args = [
        "--resident",
        "512",
        "--window",
        "128",
        "--ram-budget-mb",
        "640",
        "--max-tokens-limit",
        "4",
        "--max-body-bytes",
        "65536",
    ]
    with infinikv_server(tmp_path_factory.mktemp("fuzz"), *args) as base:
        yield base


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def test_what_a_session_cannot_hold_is_refused_at_once_and_changes_nothing(base_url) -> None:
    session = requests.post(f"{base_url}/v1/sessions", timeout=30).json()["id"]
    words = " ".join(f"word{i}" for i in range(2000))
    doc = requests.post(f"{base_url}/v1/sessions/{session}/documents", json={"text": words}, timeout=60)
    assert doc.status_code == 413 and "ram_budget_mb" in doc.json()["error"]["message"], doc.text
    turn = requests.post(
        f"{base_url}/v1/completions",
        json={"prompt": words, "max_tokens": 1, "session_id": session},
        timeout=60,
    )
    assert turn.status_code == 413 and turn.json()["error"]["code"] == "context_length_exceeded"
    state = requests.get(f"{base_url}/v1/sessions/{session}", timeout=30).json()
    assert state["tokens"] == 0 and state["documents"] == []


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case) -> None:
    case.call_and_validate(checks=[not_a_server_error], timeout=120)
