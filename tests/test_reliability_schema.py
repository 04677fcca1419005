"""The portal's OpenAPI schema, fuzzed: a bounded, derandomized schemathesis run against a real portal (uvicorn on
loopback) in front of a real engine process (`matrixstack engine serve tiny-moe --random-weights`).

With an admin key (it may call every route): no response is a 5xx, every status is one the schema documents for
its operation (400, 401, 403, 404, 413, 429 are documented with OpenAI's error object), and every body matches the
schema of its status (so each error is OpenAI's `{"error": {...}}`). Half the completion requests name the
catalog entry that the engine serves (chosen by a checksum of the body, so a run is reproducible) so that
generated bodies reach the engine too; the rest name unknown models. Without a key and with a wrong one, every
route that takes a key answers 401 in OpenAI's format, and the open ones (/health, /metrics) no 5xx.

Bounded: MAX_EXAMPLES per operation (~25 operations), derandomized (the same cases on every run)."""

from __future__ import annotations

import json
import zlib

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from matrixstack.portal.app import create_portal_app
from matrixstack.portal.catalog_service import add_entries
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import open_portal_database

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 20  # per operation; derandomized, so every run sends the same cases
MAX_EXAMPLES_WITHOUT_KEY = 5  # per operation and kind of bad key: each must be a 401 whatever the rest
SERVED = "tiny"  # the catalog entry the engine serves
ENGINE_ARGS = ("--max-model-len", "32", "--num-kv-blocks", "32", "--max-num-seqs", "8")  # short answers: a quick run
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
OPEN_ROUTES = {("GET", "/health"), ("GET", "/metrics")}  # answered without an API key
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
BOUNDED = {"derandomize": True, "deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}


@pytest.fixture(scope="module")
def portal(engine_process, tmp_path_factory):
    """Yield a running portal over a fresh SQLite file with one entry on the engine and an admin key
    (`portal.admin_key`)."""
    upstream = engine_process(*ENGINE_ARGS)[1]
    db_url = f"sqlite:///{tmp_path_factory.mktemp('schema') / 'portal.db'}"
    with open_portal_database(db_url) as svc:
        admin_key = svc.write(lambda session: create_key(session, "ops", name="admin", admin=True))[1]
        entry = EntrySpec(name=SERVED, level="L0", backend={"kind": "engine", "url": upstream})
        svc.write(lambda session: add_entries(session, [entry]))
    server = PortalThread(db_url, usage_interval_s=0.05)
    server.admin_key = admin_key
    with server:
        yield server


def portal_openapi() -> dict:
    """Return the OpenAPI document a portal serves (built from an app on an in-memory database: the tests are made
    from it when the module is collected, before any portal runs; the first test checks that the running portal
    serves the same)."""
    return create_portal_app("sqlite://").openapi()


schema = schemathesis.openapi.from_dict(portal_openapi())


def test_the_running_portal_serves_the_schema_the_cases_come_from(portal):
    assert httpx.get(f"{portal.url}/openapi.json").json() == portal_openapi()


def _aim_at_served_entry(case) -> None:
    """Name the served entry in half the completion bodies (by a checksum of the body: reproducible)."""
    if case.path in COMPLETION_PATHS and isinstance(case.body, dict) and "model" in case.body:
        if zlib.crc32(json.dumps(case.body, sort_keys=True, default=str).encode()) % 2 == 0:
            case.body["model"] = SERVED


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, **BOUNDED)
def test_no_5xx_and_only_documented_statuses_with_an_admin_key(case, portal):
    _aim_at_served_entry(case)
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {portal.admin_key}"}  # not a generated one
    case.call_and_validate(base_url=portal.url, checks=CHECKS, timeout=60)


@pytest.fixture(params=[None, "Bearer sk-not-a-key-of-this-portal"], ids=["no-key", "wrong-key"])
def bad_authorization(request) -> dict[str, str]:
    """Return the headers of a request without a key, then of one with a wrong key."""
    return {"Authorization": request.param} if request.param else {}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES_WITHOUT_KEY, **BOUNDED)
def test_without_a_valid_key_every_keyed_route_answers_401(case, portal, bad_authorization):
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    case.headers |= bad_authorization
    response = case.call(base_url=portal.url, timeout=60)
    if case.method.upper() != case.operation.method.upper():  # schemathesis tries other methods too
        assert response.status_code == 405, (case.method, case.path, response.status_code, response.text)
        return
    if (case.method.upper(), case.path) in OPEN_ROUTES:
        assert response.status_code < 500, (case.method, case.path, response.text)
        return
    assert response.status_code == 401, (case.method, case.path, response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] and error["message"], error
