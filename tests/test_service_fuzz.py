"""Property-based fuzzing of the OpenAPI schema (schemathesis) against a real server process:
whatever a client sends, the answer is never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from .server_process import infinikv_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    # Tiny generations and bodies keep every generated case cheap.
    args = ["--resident", "512", "--window", "128", "--max-tokens-limit", "4", "--max-body-bytes", "65536"]
    with infinikv_server(tmp_path_factory.mktemp("fuzz"), *args) as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case) -> None:
    case.call_and_validate(checks=[not_a_server_error], timeout=120)
