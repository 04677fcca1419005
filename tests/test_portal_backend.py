"""The lean upstream client (openai/keepalive_client.py, the portal's backend client) against a raw HTTP server on
loopback.

The server writes its responses in awkward pieces (events split inside a line, CRLF line ends, comments), so the
client's SSE splitting and batching are tested on what real servers send, not on tidy one-event reads.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from matrixstack.openai.endpoints import CHAT, COMPLETION
from matrixstack.openai.errors import UpstreamError
from matrixstack.openai.keepalive_client import KeepAliveClient
from matrixstack.openai.sse import event_block
from matrixstack.openai.transport import KeepAliveTransport

CHUNKS = [{"id": "c1", "choices": [{"index": 0, "delta": {"content": w}}]} for w in ("one", "two", "three")]


def _chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def _serve(handler):
    """Start a raw HTTP/1.1 server calling `handler(path, headers, body) -> list of (bytes, pause_s)`."""
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen.append((path, headers, body))
                for data, pause_s in handler(path, headers, body):
                    writer.write(data)
                    await writer.drain()
                    if pause_s:
                        await asyncio.sleep(pause_s)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1", seen


def _chunks(blocks: list[bytes]) -> list[dict]:
    """Return the chunks of event blocks, checking that each block is whole `data: <json>` events."""
    out = []
    for block in blocks:
        assert block.endswith(b"\n\n")
        for event in block[:-2].split(b"\n\n"):
            assert event.startswith(b"data: ")
            out.append(json.loads(event[len(b"data: ") :]))
    return out


def _stream_response(events: bytes, split_at: list[int]) -> list[tuple[bytes, float]]:
    pieces = [events[a:b] for a, b in zip([0, *split_at], [*split_at, len(events)], strict=True)]
    body = _chunked(pieces)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    # the head, then each chunk of the body in its own write with a pause, so the client reads them apart
    out = [(head, 0.0)]
    cut = 0
    for piece in pieces:
        framed = b"%x\r\n%b\r\n" % (len(piece), piece)
        out.append((framed, 0.02))
        cut += len(framed)
    out.append((body[cut:], 0.0))
    return out


def test_streams_are_split_into_events_on_any_boundary_and_batched_per_read():
    events = b"".join(b"data: %s\r\n\r\n" % json.dumps(c).encode() for c in CHUNKS) + b": ping\n\ndata: [DONE]\n\n"
    split_at = [7, len(events) // 2]  # inside the first line, then in the middle of the stream

    async def main():
        server, url, seen = await _serve(lambda path, headers, body: _stream_response(events, split_at))
        backend = KeepAliveClient(url, "sk-upstream", KeepAliveTransport())
        try:
            blocks = [b async for b in backend.stream(CHAT, {"model": "m", "messages": []})]
        finally:
            await backend.aclose()
            server.close()
        return blocks, seen

    blocks, seen = asyncio.run(main())
    assert _chunks(blocks) == CHUNKS  # each event's JSON text, unparsed, as `data: <json>` events
    assert len(blocks) >= 2  # the pieces came apart in time, so they are not one block
    path, headers, body = seen[0]
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-upstream"
    assert json.loads(body)["stream"] is True


def test_json_answers_errors_and_unreachable_backends():
    answer = json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 1}}).encode()
    error = json.dumps({"error": {"message": "no such model", "type": "invalid_request_error", "code": 404}}).encode()

    def handler(path, headers, body):
        if path == "/v1/models":
            data = json.dumps({"data": [{"id": "m1"}, {"id": "m2"}]}).encode()
        elif path == "/v1/completions":
            return [(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%b" % (len(error), error), 0.0)]
        elif json.loads(body).get("model") == "html":
            return [(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n<html>", 0.0)]
        else:
            data = answer
        return [(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(data), 0.0),
                (data, 0.0)]  # fmt: skip

    async def main():
        server, url, _ = await _serve(handler)
        backend = KeepAliveClient(url, None, KeepAliveTransport())
        results = {"chat": await backend.send(CHAT, {"model": "m"}), "models": await backend.model_ids()}
        for name, call in (
            ("404", backend.send(COMPLETION, {"model": "m"})),
            ("html", backend.send(CHAT, {"model": "html"})),
        ):
            try:
                await call
            except UpstreamError as exc:
                results[name] = exc
        await backend.aclose()
        server.close()
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        gone = KeepAliveClient(f"http://127.0.0.1:{dead}/v1", None, KeepAliveTransport())
        try:
            await gone.send(CHAT, {"model": "m"})
        except UpstreamError as exc:
            results["unreachable"] = exc
        return results

    results = asyncio.run(main())
    assert results["chat"]["usage"] == {"prompt_tokens": 1}
    assert results["models"] == ["m1", "m2"]
    assert results["404"].status_code == 404 and results["404"].message == "no such model"  # the body as sent
    assert results["html"].status_code == 502 and "non-JSON" in results["html"].message
    assert results["unreachable"].status_code == 502 and results["unreachable"].code == "upstream_unreachable"


def test_an_error_event_in_the_stream_is_raised_after_the_chunks_before_it():
    error = {"error": {"message": "engine failed", "type": "server_error", "code": 500}}
    events = b"data: %s\n\ndata: %s\n\n" % (json.dumps(CHUNKS[0]).encode(), json.dumps(error).encode())

    async def main():
        server, url, _ = await _serve(lambda path, headers, body: _stream_response(events, []))
        backend = KeepAliveClient(url, None, KeepAliveTransport())
        got = []
        with pytest.raises(UpstreamError) as raised:
            async for block in backend.stream(COMPLETION, {"model": "m", "prompt": "x"}):
                got.append(block)
        await backend.aclose()
        server.close()
        return got, raised.value

    got, exc = asyncio.run(main())
    assert _chunks(got) == [CHUNKS[0]]
    assert exc.status_code == 500 and exc.message == "engine failed"


def test_a_stream_ends_at_done_without_waiting_for_the_chunked_terminator():
    events = b"data: %s\n\ndata: [DONE]\n\n" % json.dumps(CHUNKS[0]).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    terminator_sent: list[bool] = []

    def handler(path, headers, body):  # the events, a pause, then the body's last chunk (as a busy server may)
        yield head + b"%x\r\n%b\r\n" % (len(events), events), 0.02
        terminator_sent.append(True)
        yield b"0\r\n\r\n", 0.0

    async def main():
        server, url, _ = await _serve(handler)
        backend = KeepAliveClient(url, None, KeepAliveTransport())
        got = [b async for b in backend.stream(CHAT, {"model": "m", "messages": []})]
        ended_before_the_terminator = not terminator_sent
        await backend.aclose()  # waits for the stream's last bytes
        server.close()
        return got, ended_before_the_terminator

    got, ended_early = asyncio.run(main())
    assert _chunks(got) == [CHUNKS[0]]
    assert ended_early  # before: the last batch waited for the terminator (the drain ran in the generator)


def test_event_blocks_pass_openai_style_events_as_sent_and_rewrite_anything_else():
    clean = b'data: {"a":1}\n\ndata: {"b":"x: y"}\n\n'
    assert event_block(clean) == (clean, False)
    assert event_block(clean + b"data: [DONE]\n\n") == (clean, True)
    messy = b': ping\n\nevent: chunk\ndata:{"a":1}\n\ndata:  {"b":2} \n\ndata: [DONE]\n\ndata: {"late":1}\n\n'
    assert event_block(messy) == (b'data: {"a":1}\n\ndata: {"b":2}\n\n', True)  # nothing after [DONE]
    assert event_block(b": only a comment\n\n") == (b"", False)
