"""Issue 15 point 2 for a body under the size limit: a large request body is parsed, validated and checked off the
server's event loop (in a child process of `openai.body_pool`), on the engine and through the portal, and a large
body gets the same answers as a small one — served when valid, the same 400 / 404 when not.

Both servers run in this process (uvicorn on loopback: the engine over tiny-moe, the portal over it), so a JSON
parse of a large body on either's event loop would run here: the test watches `json.loads` and `orjson.loads` (what
FastAPI and `Endpoint.parse` parse with) for any body over the pool's threshold."""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
from test_engine_server import CONFIG, build_model
from test_portal_hardening import portal_on

from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.server import create_app
from matrixstack.openai.body_pool import DEFAULT_THRESHOLD_BYTES
from matrixstack.openai.server import ServerThread

MIB = 1024 * 1024
JSON = {"content-type": "application/json"}
USER = [{"role": "user", "content": "hi"}]
PADDING = "u" * (DEFAULT_THRESHOLD_BYTES + 1024)  # as `user` (accepted, unused): any body with it is large


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = build_model()
    async_engine = AsyncEngine(LLMEngine(ModelRunner(model, CONFIG), tokenizer, CONFIG))
    server = ServerThread(create_app(async_engine, "tiny-moe")).start()
    yield server
    server.stop()
    async_engine.close()


@pytest.fixture(scope="module")
def portal(engine, tmp_path_factory):
    with portal_on(engine.url, tmp_path_factory.mktemp("portal")) as server:
        yield server


@pytest.fixture(params=["engine", "portal"])
def path(request, engine, portal) -> tuple[str, str, dict[str, str]]:
    """(base URL, model, headers) of one path: the engine called directly, or through the portal."""
    if request.param == "engine":
        return engine.url, "tiny-moe", {}
    return portal.url, "tiny", {"Authorization": f"Bearer {portal.key}"}


@pytest.fixture
def large_parses(monkeypatch) -> list[int]:
    """The sizes of the bodies over the threshold that `json.loads` or `orjson.loads` parse in this process."""
    sizes: list[int] = []

    def watched(loads):
        def spy(data, *args, **kwargs):
            if len(data) > DEFAULT_THRESHOLD_BYTES:
                sizes.append(len(data))
            return loads(data, *args, **kwargs)

        return spy

    monkeypatch.setattr(json, "loads", watched(json.loads))
    monkeypatch.setattr(orjson, "loads", watched(orjson.loads))
    return sizes


def post(path, route: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    url, _, auth = path
    sent = {name: value for name, value in {**JSON, **auth, **(headers or {})}.items() if value}  # "": not sent
    return httpx.post(f"{url}/v1{route}", content=content, headers=sent, timeout=60)


def chat(model: str, **fields) -> bytes:
    return json.dumps({"model": model, "messages": USER, **fields}).encode()


def test_a_large_prompt_is_refused_without_being_parsed_on_the_event_loop(path, large_parses):
    model = path[1]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * (3 * MIB // 5)}]})
    answer = post(path, "/chat/completions", body.encode())
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert large_parses == []  # parsed in a child process, not on either server's event loop
    small = post(path, "/chat/completions", chat(model, max_tokens=2, ignore_eos=True))
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_valid_body_is_served(path, large_parses, stream):
    model = path[1]
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    answer = post(
        path, "/chat/completions", chat(model, max_tokens=2, ignore_eos=True, user=PADDING, stream=stream, **usage)
    )
    assert answer.status_code == 200, answer.text
    if stream:
        assert answer.text.rstrip().endswith("data: [DONE]") and '"completion_tokens":2' in answer.text
    else:
        assert answer.json()["usage"]["completion_tokens"] == 2
    completion = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2, "ignore_eos": True, "user": PADDING})
    answer = post(path, "/completions", completion.encode())
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    assert large_parses == []


def invalid_bodies(model: str, padding: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Return invalid request bodies (and extra headers) by name, each carrying `user=padding`."""

    def body(**fields) -> bytes:
        return json.dumps({"model": model, "messages": USER, "max_tokens": 2, "user": padding, **fields}).encode()

    return {
        "lax type": (body(max_tokens="4"), {}),
        "unknown field": (body(foo=1), {}),
        "no messages": (json.dumps({"model": model, "user": padding}).encode(), {}),
        "a bad role": (body(messages=[{"role": "robot", "content": "x"}]), {}),
        "unknown model": (body(model="no-such-model"), {}),
        "n above one": (body(n=2), {}),
        "an empty stop string": (body(stop=[""]), {}),
        "tools": (body(tools=[{"type": "function"}]), {}),
        "not JSON": (body()[:-1] + b",}", {}),
        "not an object": (json.dumps([padding]).encode(), {}),
        "not UTF-8": (body()[:-2] + b'\xff"}', {}),
        "no content type": (body(), {"content-type": ""}),
    }


def test_a_large_invalid_body_gets_the_small_ones_error(path):
    small, large = invalid_bodies(path[1], "u"), invalid_bodies(path[1], PADDING)
    for name, (content, headers) in small.items():
        expected = post(path, "/chat/completions", content, headers)
        answer = post(path, "/chat/completions", *large[name])
        assert answer.status_code == expected.status_code, (name, answer.text)
        if expected.status_code == 200:  # the portal reads a body without a content type as JSON, as before
            continue
        assert answer.status_code in (400, 404), (name, answer.text)
        error, expected_error = answer.json()["error"], expected.json()["error"]
        # the same error, but for the input a message quotes (the padding itself, where it is the bad value)
        assert {**error, "message": None} == {**expected_error, "message": None}, name
        assert error["message"].split(" (got")[0] == expected_error["message"].split(" (got")[0], name
