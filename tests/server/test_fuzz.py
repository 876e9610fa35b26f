"""schemathesis against the server's own OpenAPI schema: no generated request gets a 5xx.

Every operation (JSON and multipart bodies, path and query parameters) gets a bounded number of
generated examples; the server runs with max_steps=2 so a generated valid request stays fast.
Each 4xx must be the ErrorBody naming a field. After the run the server still answers.
"""
from __future__ import annotations

import httpx
import pytest
from needs import need
from serving import start_server

schemathesis = need("schemathesis", reason="schemathesis is not installed (pip install editrt[dev])")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(reposition, elements_pipe):
    with start_server(reposition, elements_pipe, max_steps=2) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_5xx_on_generated_requests(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "field", "message"} and body["field"], body


def test_still_serving_after_the_fuzz(fuzz_server):
    assert httpx.get(f"{fuzz_server.url}/healthz", timeout=10).json() == {"status": "ok"}
