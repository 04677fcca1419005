"""The portal's backend transport and stream relay against real HTTP servers on loopback.

A small FastAPI app on a uvicorn thread plays the backend: it reports which client connection (the client's port)
each request came on, streams SSE, answers slowly, closes connections, and serves an OpenAI-like chat stream that
ignores `stream_options` (a vendor that sends no usage), behind a real portal.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from matrixstack.openai.endpoints import CHAT
from matrixstack.openai.errors import UpstreamError
from matrixstack.openai.httpx_client import HttpxClient
from matrixstack.openai.server import ServerThread
from matrixstack.openai.transport import KeepAliveTransport
from matrixstack.portal.catalog_service import add_entry
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import usage_report

WAIT_S = 30.0  # a failure guard for polls, never a timing assertion
WORDS = ["alpha", "beta", "gamma", "delta"]
ENDLESS = 100_000  # a max_tokens that makes the test vendor stream until the client leaves


class Backend:
    """State the test backend shares with the tests."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.bodies: list[dict] = []


def backend_app(state: Backend) -> FastAPI:
    app = FastAPI()

    @app.get("/port")
    def port(request: Request) -> dict:
        return {"port": request.client.port}

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"port": request.client.port, "body": await request.json()})

    @app.get("/close")
    def close(request: Request) -> JSONResponse:
        return JSONResponse({"port": request.client.port}, headers={"Connection": "close"})

    @app.get("/big")
    def big() -> PlainTextResponse:
        return PlainTextResponse("x" * 300_000)

    @app.get("/chunked")
    def chunked() -> StreamingResponse:
        return StreamingResponse(iter([b"a" * 70_000, b"b" * 10, b"c" * 100_000]), media_type="text/plain")

    @app.get("/slow")
    async def slow() -> dict:
        await asyncio.sleep(1)  # longer than the test's read timeout
        return {}

    @app.get("/forever")
    def forever() -> StreamingResponse:
        async def events():
            try:
                for i in range(10_000):
                    yield f"data: {json.dumps({'i': i})}\n\n"
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                state.cancelled.set()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.bodies.append(body)
        if body.get("model") != "vendor-model":
            return JSONResponse(
                {"error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                           "code": "model_not_found"}},
                status_code=404,
            )  # fmt: skip
        base = {"id": "chatcmpl-v", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            usage = {"prompt_tokens": 3, "completion_tokens": len(WORDS), "total_tokens": 3 + len(WORDS)}
            message = {"role": "assistant", "content": " ".join(WORDS)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

        async def endless():  # until the client goes away
            try:
                for i in range(100_000):
                    choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
                    yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                state.cancelled.set()
                raise

        if body.get("max_tokens") == ENDLESS:
            return StreamingResponse(endless(), media_type="text/event-stream")

        async def events():  # ignores stream_options: no usage chunk
            for word in WORDS:
                choice = {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}
                yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def backend():
    state = Backend()
    server = ServerThread(backend_app(state))  # bind_socket sets TCP_NODELAY
    with server:
        server.state = state
        yield server


def run(coro):
    return asyncio.run(coro)


def test_connections_are_kept_alive_and_reused(backend):
    async def scenario() -> None:
        async with httpx.AsyncClient(transport=KeepAliveTransport(), base_url=backend.url) as client:
            ports = {(await client.get("/port")).json()["port"] for _ in range(5)}
            assert len(ports) == 1  # one connection for five sequential requests
            echoed = (await client.post("/echo", json={"a": [1, 2, 3]})).json()
            assert echoed["body"] == {"a": [1, 2, 3]} and echoed["port"] in ports
            # 20 at once: several connections, all kept for later
            answers = await asyncio.gather(*(client.get("/port") for _ in range(20)))
            busy = {a.json()["port"] for a in answers}
            again = await asyncio.gather(*(client.get("/port") for _ in range(len(busy))))
            assert {a.json()["port"] for a in again} <= busy

    run(scenario())


def test_connection_close_bodies_and_chunked_responses(backend):
    async def scenario() -> None:
        async with httpx.AsyncClient(transport=KeepAliveTransport(), base_url=backend.url) as client:
            first = (await client.get("/close")).json()["port"]
            assert (await client.get("/close")).json()["port"] != first  # the server said close: not reused
            assert (await client.get("/big")).text == "x" * 300_000
            assert (await client.get("/chunked")).text == "a" * 70_000 + "b" * 10 + "c" * 100_000
            async with client.stream("GET", "/chunked") as response:
                parts = [part async for part in response.aiter_bytes()]
            assert b"".join(parts) == b"a" * 70_000 + b"b" * 10 + b"c" * 100_000

    run(scenario())


def test_read_timeout_and_unreachable_backend_are_httpx_errors(backend):
    async def scenario() -> None:
        transport = KeepAliveTransport()
        async with httpx.AsyncClient(
            transport=transport, base_url=backend.url, timeout=httpx.Timeout(5, read=0.2)
        ) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get("/slow")
            assert (await c.get("/port")).status_code == 200  # the timed-out connection was dropped, not reused
        engine = HttpxClient("http://127.0.0.1:9/v1", transport=KeepAliveTransport())  # discard port: refused
        with pytest.raises(UpstreamError) as err:
            await engine.model_ids()
        assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"
        await engine.aclose()

    run(scenario())


def test_a_stream_closed_early_drops_its_connection_and_the_backend_sees_it(backend):
    backend.state.cancelled.clear()

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=KeepAliveTransport(), base_url=backend.url) as client:
            async with client.stream("GET", "/forever") as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        break
            assert (await client.get("/port")).status_code == 200

    run(scenario())
    assert backend.state.cancelled.wait(WAIT_S)


def test_backend_errors_pass_through_the_httpx_client(backend):
    async def scenario() -> None:
        engine = HttpxClient(f"{backend.url}/v1", transport=KeepAliveTransport())
        with pytest.raises(UpstreamError) as err:
            await engine.send(CHAT, {"model": "nope", "messages": []})
        assert err.value.status_code == 404 and err.value.code == "model_not_found"
        reply = await engine.send(CHAT, {"model": "vendor-model", "messages": []})
        assert reply["usage"]["completion_tokens"] == len(WORDS)
        await engine.aclose()

    run(scenario())


@pytest.mark.slow
def test_a_connection_the_server_closed_while_idle_is_replaced():
    server = ServerThread(backend_app(Backend()))
    server.server.config.timeout_keep_alive = 0.1  # uvicorn closes connections idle this long

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=KeepAliveTransport(), base_url=server.url) as client:
            first = (await client.get("/port")).json()["port"]
            await asyncio.sleep(0.5)  # past the server's keep-alive: it closed the connection
            second = await client.get("/port")
            assert second.status_code == 200 and second.json()["port"] != first

    with server:
        run(scenario())


def test_portal_adds_the_usage_chunk_a_vendor_does_not_send(backend, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'p.db'}"
    with open_portal_database(db_url) as svc:
        _, key = svc.write(lambda session: create_key(session, "acme"))
        backend_spec = {"kind": "upstream", "url": f"{backend.url}/v1", "model": "vendor-model", "api_key": "s"}
        svc.write(
            lambda session: add_entry(
                session, EntrySpec(name="vendor", level="L0", provider="third-party", backend=backend_spec)
            )
        )
    with PortalThread(db_url) as portal:
        client = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
        chunks = list(
            client.chat.completions.create(model="vendor", messages=[{"role": "user", "content": "hi"}], stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(w + " " for w in WORDS)
        assert chunks[-1].choices == [] and chunks[-1].model == "vendor"
        assert chunks[-1].usage.completion_tokens == len(WORDS)  # one per content chunk, as no usage came
        assert backend.state.bodies[-1]["stream_options"] == {"include_usage": True}
        assert backend.state.bodies[-1]["model"] == "vendor-model"
        reply = client.chat.completions.create(model="vendor", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "vendor" and reply.usage.total_tokens == 3 + len(WORDS)
        assert portal.portal.writer.flush()
        rows = portal.portal.db.read(lambda session: usage_report(session, group_by=("entry",)))
        assert rows == [{"entry": "vendor", "requests": 2, "prompt_tokens": 3, "completion_tokens": 2 * len(WORDS),
                         "total_tokens": 3 + 2 * len(WORDS), "errors": 0}]  # fmt: skip


def test_a_client_that_hangs_up_cancels_the_backend_request(backend, tmp_path):
    backend.state.cancelled.clear()
    db_url = f"sqlite:///{tmp_path / 'p.db'}"
    with open_portal_database(db_url) as svc:
        _, key = svc.write(lambda session: create_key(session, "acme"))
        backend_spec = {"kind": "upstream", "url": f"{backend.url}/v1", "model": "vendor-model"}
        svc.write(
            lambda session: add_entry(
                session, EntrySpec(name="vendor", level="L0", provider="third-party", backend=backend_spec)
            )
        )
    with PortalThread(db_url) as portal:
        client = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        stream = client.chat.completions.create(model="vendor", messages=messages, stream=True, max_tokens=ENDLESS)
        next(iter(stream))
        stream.close()
        assert backend.state.cancelled.wait(WAIT_S)  # the portal closed its backend connection
        assert portal.portal.writer.flush()
        deadline = time.monotonic() + WAIT_S
        while not portal.portal.db.read(lambda session: usage_report(session, group_by=("entry",))):
            assert time.monotonic() < deadline
            portal.portal.writer.flush()
        row = portal.portal.db.read(lambda session: usage_report(session, group_by=("entry",)))[0]
        assert row["errors"] == 1 and row["completion_tokens"] >= 1


@pytest.mark.slow
def test_an_unreachable_backend_is_a_502_in_openai_format(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'p.db'}"
    with open_portal_database(db_url) as svc:
        _, key = svc.write(lambda session: create_key(session, "acme"))
        svc.write(
            lambda session: add_entry(
                session, EntrySpec(name="gone", level="L0", backend={"kind": "engine", "url": "http://127.0.0.1:9/v1"})
            )
        )
    with PortalThread(db_url) as portal:
        client = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model="gone", messages=[{"role": "user", "content": "x"}], stream=stream)
            assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"


def test_the_chunked_decoder_gives_the_same_payload_for_any_split_of_the_body():
    from matrixstack.openai.transport import _ChunkedBody

    payload = [b"data: one\n\n", b"data: two\n\n", b"x" * 300]
    body = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in payload) + b"0\r\nTrailer: t\r\n\r\n"
    for step in (1, 2, 7, len(body)):
        decoder = _ChunkedBody()
        out = b"".join(decoder.feed(body[i : i + step]) for i in range(0, len(body), step))
        assert out == b"".join(payload) and decoder.done, step
    for bad in (b"zz\r\n", b"-5\r\nhello\r\n"):
        with pytest.raises(httpx.RemoteProtocolError, match="bad chunk size line"):
            _ChunkedBody().feed(bad)
    with pytest.raises(httpx.RemoteProtocolError, match="longer than its size"):
        _ChunkedBody().feed(b"2\r\nabc\r\n")
