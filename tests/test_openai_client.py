"""The upstream clients (`openai.client`: the lean keep-alive one and the httpx one) against a real engine server
process.

The upstream is `matrixstack engine serve tiny-moe --random-weights --port 0` in a second process (as a user
would run it); the module stops it with SIGINT (Ctrl-C) and checks it exits cleanly.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from matrixstack.errors import UserError
from matrixstack.openai.client import upstream_client
from matrixstack.openai.endpoints import CHAT, COMPLETION
from matrixstack.openai.errors import UpstreamError
from matrixstack.openai.httpx_client import HttpxClient
from matrixstack.openai.keepalive_client import KeepAliveClient
from matrixstack.openai.transport import KeepAliveTransport

MODEL_ID = "tiny-moe"
STOP_TIMEOUT_S = 30.0
NO_EOS = {"ignore_eos": True}
CLIENTS = {
    "keepalive": lambda url, key=None: KeepAliveClient(url, key, KeepAliveTransport()),
    "httpx": lambda url, key=None: HttpxClient(url, key),
}


def chunks_of(blocks: list[bytes]) -> list[dict]:
    """Return the chunks the event blocks of a stream carry."""
    return [json.loads(event.removeprefix(b"data: ")) for block in blocks for event in block.split(b"\n\n") if event]


# ---- the clients against a real engine server process ------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(engine_process):
    """Start `matrixstack engine serve` on a free port in a second process; yield (process, base URL)."""
    return engine_process(
        *["--max-model-len", "128", "--num-kv-blocks", "16", "--max-num-seqs", "4", "--max-num-batched-tokens", "128"]
    )


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("client", CLIENTS)
def test_client_against_engine_server(upstream, client):
    _, base_url = upstream

    async def scenario() -> None:
        engine = CLIENTS[client](base_url, "secret")
        try:
            assert await engine.health()
            assert await engine.model_ids() == [MODEL_ID]
            body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 5, "temperature": 0, **NO_EOS}
            whole = await engine.send(COMPLETION, body)
            assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 5
            usage_asked = {**body, "stream_options": {"include_usage": True}}
            chunks = chunks_of([b async for b in engine.stream(COMPLETION, usage_asked)])
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
            assert chunks[-1]["usage"]["completion_tokens"] == 5

            chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **NO_EOS}
            reply = await engine.send(CHAT, {**chat, "temperature": 0})
            assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] == 4
            streamed = chunks_of([b async for b in engine.stream(CHAT, {**chat, "temperature": 0})])
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed)
            assert text == reply["choices"][0]["message"]["content"]
        finally:
            await engine.aclose()

    run(scenario())


@pytest.mark.parametrize("client", CLIENTS)
def test_client_passes_openai_errors_through(upstream, client):
    _, base_url = upstream

    async def scenario() -> None:
        engine = CLIENTS[client](base_url)
        try:
            with pytest.raises(UpstreamError) as err:
                await engine.send(COMPLETION, {"model": "nope", "prompt": "x"})
            assert err.value.status_code == 404 and err.value.code == "model_not_found"
            assert set(err.value.body["error"]) == {"message", "type", "param", "code"}
            with pytest.raises(UpstreamError) as err:
                await engine.send(CHAT, {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "n": 2})
            assert err.value.status_code == 400 and err.value.param == "n"
            with pytest.raises(UpstreamError) as err:
                async for _ in engine.stream(COMPLETION, {"model": MODEL_ID, "prompt": "x", "temperature": -1}):
                    pass
            assert err.value.status_code == 400 and err.value.param == "temperature"
        finally:
            await engine.aclose()

    run(scenario())


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_upstream_is_502(client):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> None:
        engine = CLIENTS[client](f"http://127.0.0.1:{port}/v1")
        try:
            assert not await engine.health()
            with pytest.raises(UpstreamError) as err:
                await engine.model_ids()
            assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"
        finally:
            await engine.aclose()

    run(scenario())


def test_the_client_is_picked_by_scheme():
    assert isinstance(upstream_client("http://127.0.0.1:8000/v1"), KeepAliveClient)
    assert isinstance(upstream_client("https://api.example.com/v1"), HttpxClient)
    with pytest.raises(UserError, match="http"):
        upstream_client("127.0.0.1:8000")


def test_engine_serve_stops_cleanly_on_ctrl_c(upstream):  # last: it stops the module's upstream
    process, _ = upstream
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    assert process.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out
