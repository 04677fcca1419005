"""Issue 15's request-path hardening, through a real portal in front of a real engine (both uvicorn on loopback,
the engine in-process over tiny-moe with a runner a test can make fail): request bodies are limited (413) and
read incrementally, types are as strict as OpenAI's, a stream cut by a failed engine still ends with `[DONE]`,
every response carries anti-framing headers, `/docs` loads nothing from elsewhere, and a client that sends its
request head slowly is disconnected while others are served."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import openai
import pytest
from test_engine_server import CONFIG, NO_EOS, ControlledRunner, build_model

from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.server import create_app
from matrixstack.openai.server import ServerThread
from matrixstack.portal.catalog_service import add_entries
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import open_portal_database

MIB = 1024 * 1024
WAIT_S = 15.0  # a failure guard for what must happen, never a timing assertion
FRAME_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = build_model()
    runner = ControlledRunner(ModelRunner(model, CONFIG))
    async_engine = AsyncEngine(LLMEngine(runner, tokenizer, CONFIG))
    server = ServerThread(create_app(async_engine, "tiny-moe")).start()
    yield server, async_engine, runner
    server.stop()
    async_engine.close()


def portal_on(engine_url: str, folder) -> PortalThread:
    """Return a portal (not started) over a fresh SQLite file in `folder` with one L0 `tiny` on the engine at
    `engine_url` and a key of tenant acme (`portal.key`)."""
    db_url = f"sqlite:///{folder / 'portal.db'}"
    with open_portal_database(db_url) as db:
        _, key = db.write(lambda session: create_key(session, "acme"))
        entry = EntrySpec(name="tiny", level="L0", backend={"kind": "engine", "url": f"{engine_url}/v1"})
        db.write(lambda session: add_entries(session, [entry]))
    server = PortalThread(db_url, usage_interval_s=0.05)
    server.key = key
    return server


@pytest.fixture(scope="module")
def portal(engine, tmp_path_factory):
    with portal_on(engine[0].url, tmp_path_factory.mktemp("portal")) as server:
        yield server


def post(portal, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {portal.key}", **kwargs.pop("headers", {})}
    return httpx.post(f"{portal.base_url}{path}", headers=headers, timeout=60, **kwargs)


def test_a_body_over_the_limit_is_413_with_or_without_content_length(portal):
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (5 * MIB)}]}).encode()
    announced = post(portal, "/chat/completions", content=big, headers={"content-type": "application/json"})
    assert announced.status_code == 413
    assert announced.json()["error"]["code"] == "request_too_large" and "4 MiB" in announced.json()["error"]["message"]

    def pieces():
        for start in range(0, len(big), MIB):
            yield big[start : start + MIB]

    chunked = post(portal, "/chat/completions", content=pieces(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    admin = httpx.post(f"{portal.url}/admin/tenants", content=big, headers={"content-type": "application/json"})
    assert admin.status_code == 413  # every route, not only the completions
    client = openai.OpenAI(base_url=portal.base_url, api_key=portal.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:  # the official client reads the 413 of a closed connection
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * (5 * MIB)}])
    assert err.value.status_code == 413 and err.value.code == "request_too_large"


def test_lax_types_and_a_non_json_body_are_400(portal):
    client = openai.OpenAI(base_url=portal.base_url, api_key=portal.key, max_retries=0)
    for field, value in (("max_tokens", "4"), ("stream", "yes"), ("temperature", "0.5")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=USER, **{field: value})
        assert err.value.param == field
    text = post(portal, "/chat/completions", content=json.dumps({"model": "tiny", "messages": USER}),
                headers={"content-type": "text/plain"})  # fmt: skip
    assert text.status_code == 400 and "application/json" in text.json()["error"]["message"]
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).usage.completion_tokens >= 1


def test_a_stream_cut_by_the_engine_ends_with_an_error_event_then_done(portal, engine):
    runner = engine[2]
    body = {"model": "tiny", "prompt": "Go on", "max_tokens": 200, "stream": True, **NO_EOS}
    headers = {"Authorization": f"Bearer {portal.key}"}
    with httpx.stream("POST", f"{portal.base_url}/completions", json=body, headers=headers, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        runner.fail_next.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]  # the portal's own error, not the engine's text
    assert error["code"] == "upstream_error" and "worker" not in error["message"]


def test_every_response_forbids_framing_and_docs_load_nothing_from_elsewhere(portal):
    responses = [
        httpx.get(f"{portal.url}/health"),
        httpx.get(f"{portal.url}/dashboard"),
        httpx.get(f"{portal.url}/docs"),
        post(portal, "/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 1}),
        httpx.post(f"{portal.base_url}/chat/completions", json={}),  # 401
    ]
    for response in responses:
        assert {k: response.headers.get(k) for k in FRAME_HEADERS} == FRAME_HEADERS, response.url
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], response.url
    dashboard, docs = responses[1], responses[2]
    assert "default-src 'self'" in dashboard.headers["content-security-policy"]  # its own policy kept
    assert docs.status_code == 200 and "/v1/chat/completions" in docs.text and "openapi.json" in docs.text
    assert "<script" not in docs.text and "://" not in docs.text  # no script, no absolute URL: nothing loaded
    assert httpx.get(f"{portal.url}/redoc").status_code == 404


def closed(sock: socket.socket) -> bool:
    """Return True when the peer closed `sock` (a read returns end of file, or the connection was reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1024) == b""
    except ConnectionError:
        return True


def test_slow_request_heads_are_disconnected_while_other_requests_are_served(engine):
    """Connections that trickle their request head a header line at a time are closed by the server after its
    header timeout, whatever they send, while a normal request is answered."""
    with ServerThread(create_app(engine[1], "tiny-moe"), header_timeout_s=0.5) as server:
        slow = [socket.create_connection((server.host, server.port)) for _ in range(50)]
        try:
            for sock in slow:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            assert httpx.get(f"{server.url}/health").status_code == 200
            open_ = set(slow)
            deadline = time.monotonic() + WAIT_S
            while open_ and time.monotonic() < deadline:
                for sock in list(open_):
                    if closed(sock):
                        open_.discard(sock)
                        continue
                    try:
                        sock.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        open_.discard(sock)
                time.sleep(0.1)
            assert not open_, f"{len(open_)} of {len(slow)} slow connections are still open"
            assert httpx.get(f"{server.url}/health").status_code == 200
        finally:
            for sock in slow:
                sock.close()
