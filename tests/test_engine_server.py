"""The OpenAI-compatible engine server, called with the official `openai` client over loopback.

One uvicorn server runs on a background thread for the whole module, over tiny-moe (the packaged weights when
they exist, seeded random weights otherwise) with small engine limits. Its runner is wrapped so a test can make
the next step fail (a worker that died) and can count the steps run (cancellation).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from matrixstack.arch import load_arch
from matrixstack.engine import PACKAGED_WEIGHTS
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.loading import load_model
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.server import create_app
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.openai.server import ServerThread

MODEL_ID = "tiny-moe"
MAX_MODEL_LEN = 256
CONFIG = EngineConfig(
    block_size=16, num_kv_blocks=32, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=MAX_MODEL_LEN
)
NO_EOS = {"ignore_eos": True}  # the extension field: outputs of exactly max_tokens tokens
DRAIN_TIMEOUT_S = 30.0  # how long a test waits for the engine to drop an aborted request before failing
STEP_DELAY_S = 0.01  # the disconnect tests' steps take at least this: a whole request then outlasts the detection


class ControlledRunner:
    """A ModelRunner wrapper: counts steps, fails the next step on demand (a worker that died), and can make every
    step take at least `delay_s` (a model slow enough that aborting a request saves most of its steps)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.steps = 0
        self.fail_next = threading.Event()
        self.delay_s = 0.0

    def run(self, out):
        self.steps += 1
        time.sleep(self.delay_s)
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("worker 1 died (exit code -9)")
        return self.runner.run(out)


def build_model() -> tuple[MoETransformer, Tokenizer]:
    weights = PACKAGED_WEIGHTS["tiny-moe"]
    if any(weights.glob("*.safetensors")):
        return load_model("tiny-moe")
    torch.manual_seed(0)
    model = MoETransformer(load_arch("tiny-moe")).eval()
    return model, Tokenizer.from_file(weights / "tokenizer.json")


@pytest.fixture(scope="module")
def deployment():
    model, tokenizer = build_model()
    runner = ControlledRunner(ModelRunner(model, CONFIG))
    engine = AsyncEngine(LLMEngine(runner, tokenizer, CONFIG))
    server = ServerThread(create_app(engine, MODEL_ID)).start()
    yield server, engine, runner
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def url(deployment) -> str:
    return deployment[0].url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(engine: AsyncEngine) -> None:
    """Wait until the engine holds no request and every KV block is free again (fails after DRAIN_TIMEOUT_S)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    blocks = engine.engine.scheduler.block_manager
    while engine.engine.has_work() or blocks.num_free_blocks != CONFIG.num_kv_blocks:
        assert time.monotonic() < deadline, "the engine still holds the request"
        time.sleep(0.05)


def test_health_models_and_openapi(client, url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= set(paths)


def test_completion_text_and_token_ids(client):
    out = client.completions.create(model=MODEL_ID, prompt="The cat", max_tokens=6, temperature=0, extra_body=NO_EOS)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    ids = client.completions.create(model=MODEL_ID, prompt=[1, 200, 300], max_tokens=3, extra_body=NO_EOS)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_chat_completion_and_max_completion_tokens(client):
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_completion_tokens=5,
        temperature=0,
        extra_body=NO_EOS,
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_concurrent_requests_batch_together(client):
    prompts = ["one", "two two", "three three three", "four"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(
            pool.map(
                lambda p: client.completions.create(model=MODEL_ID, prompt=p, max_tokens=6, extra_body=NO_EOS), prompts
            )
        )
    assert [o.usage.completion_tokens for o in outs] == [6] * len(prompts)
    assert len({o.id for o in outs}) == len(prompts)


def test_chat_content_parts_and_developer_role(client):
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        ],
        max_tokens=2,
        extra_body=NO_EOS,
    )
    assert out.usage.completion_tokens == 2
    plain = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=2,
        extra_body=NO_EOS,
    )
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens


def test_streamed_completion_matches_non_streamed_with_usage(client):
    kwargs = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, extra_body=NO_EOS)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(**kwargs, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_streamed_chat_with_usage(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    kwargs = dict(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0, extra_body=NO_EOS)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_string_cuts_the_output(client):
    base = dict(model=MODEL_ID, prompt="In the beginning", temperature=0, extra_body=NO_EOS)
    text = client.completions.create(**base, max_tokens=24).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3, text
    cut = client.completions.create(**base, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(**base, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_seed_reproducible(client):
    def sample(seed: int) -> str:
        out = client.completions.create(
            model=MODEL_ID, prompt="A seed", max_tokens=8, temperature=1, seed=seed, extra_body=NO_EOS
        )
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_bad_request_is_openai_400(client, url):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="x", temperature=-1)
    assert err.value.status_code == 400 and err.value.param == "temperature"
    raw = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "temperature": -1})
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "temperature" in error["message"]
    unknown_field = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "foo": 1})
    assert unknown_field.status_code == 400 and unknown_field.json()["error"]["param"] == "foo"
    not_json = httpx.post(f"{url}/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]


def test_over_long_prompt_names_the_limit(client):
    prompt = "word " * (MAX_MODEL_LEN + 50)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4)
    assert f"max_model_len={MAX_MODEL_LEN}" in err.value.message
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": prompt}], stream=True
        )  # refused before the stream starts
    assert f"max_model_len={MAX_MODEL_LEN}" in err.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and MODEL_ID in err.value.message


def test_n_above_one_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="x", n=2)
    assert err.value.param == "n" and "n=1" in err.value.message


def test_engine_failure_is_500_and_stream_error_event(client, deployment):
    _, engine, runner = deployment
    runner.fail_next.set()
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=4)
    assert "worker 1 died" in err.value.message
    stream = client.completions.create(model=MODEL_ID, prompt="y", max_tokens=200, stream=True, extra_body=NO_EOS)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    runner.fail_next.set()
    with pytest.raises(openai.APIError, match="worker 1 died"):
        list(stream)
    wait_idle(engine)
    assert client.completions.create(model=MODEL_ID, prompt="z", max_tokens=2).usage.completion_tokens >= 1


@pytest.fixture
def slow_steps(deployment):
    """Make every step of the module's runner take at least STEP_DELAY_S during a test."""
    runner = deployment[2]
    runner.delay_s = STEP_DELAY_S
    yield
    runner.delay_s = 0.0


def test_stream_disconnect_aborts_the_request(url, deployment, slow_steps):
    _, engine, runner = deployment
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL_ID, "prompt": "Go on and on", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    steps_before = runner.steps
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert engine.engine.has_work()
    wait_idle(engine)
    assert runner.steps - steps_before < max_tokens // 2  # aborted, not run to max_tokens


def test_non_streamed_disconnect_aborts_the_request(url, deployment, slow_steps):
    _, engine, runner = deployment
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL_ID, "prompt": "Go on", "max_tokens": max_tokens, "ignore_eos": True}
    steps_before = runner.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_idle(engine)
    assert runner.steps - steps_before < max_tokens // 2  # ~0.75 s to notice at most: ~75 steps of 240


class HeldRunner:
    """A ModelRunner wrapper whose steps wait, once `hold` is set, until `release` is (a long step); counts steps."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.steps = 0
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()

    def run(self, out):
        self.steps += 1
        if self.hold.is_set():
            self.held.set()
            self.release.wait(DRAIN_TIMEOUT_S)
        return self.runner.run(out)


def test_requests_and_aborts_never_wait_for_a_step():
    model, tokenizer = build_model()
    runner = HeldRunner(ModelRunner(model, CONFIG))
    engine = AsyncEngine(LLMEngine(runner, tokenizer, CONFIG))
    params = SamplingParams(max_tokens=50, ignore_eos=True)

    async def scenario() -> float:
        a = engine.stream([1, 2, 3], params, "a")
        await a.__anext__()
        runner.hold.set()
        assert await asyncio.to_thread(runner.held.wait, DRAIN_TIMEOUT_S)  # a step runs, and holds
        started = time.monotonic()
        first_b = asyncio.ensure_future(engine.stream([4, 5, 6], params, "b").__anext__())
        await asyncio.sleep(0)  # b is handed to the engine thread
        await a.aclose()  # aborts a
        first_b.cancel()  # b's consumer leaves before the engine took b in
        with pytest.raises(asyncio.CancelledError):
            await first_b
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 1.0  # while the step still holds
        steps = runner.steps
        runner.release.set()
        wait_idle(engine)
        assert runner.steps == steps  # the held step was the last: a aborted, b never started
    finally:
        runner.release.set()
        engine.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-arch"], "no-such-arch"),
        (["tiny-moe", "--num-kv-blocks", "1"], "num_kv_blocks"),
        (["tiny-moe", "--max-model-len", "0"], "--max-model-len"),
        (["tiny-moe", "--workers", "0"], "--workers"),
        (["tiny-moe", "--dtype", "int3"], "--dtype"),
    ],
)
def test_engine_serve_bad_input_exits_2(cli, args, message):
    result = cli("engine", "serve", *args, "--port", "0")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_engine_serve_missing_weights_and_taken_port_exit_2(cli, tmp_path):
    result = cli("engine", "serve", "tiny-moe", "--weights", str(tmp_path), "--port", "0")
    assert result.exit_code == 2 and "safetensors" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("engine", "serve", "tiny-moe", "--port", str(port), "--random-weights")
    assert result.exit_code == 2 and f"127.0.0.1:{port}" in result.output


# ---- hardening (issue 15): body limit, strict types, prompt length, tokenising off the loop --------------------

MIB = 1024 * 1024


def test_a_body_over_the_limit_is_413_whether_its_length_is_announced_or_not(url):
    big = b'{"model": "tiny-moe", "prompt": "' + b"x" * (5 * MIB) + b'"}'
    announced = httpx.post(f"{url}/v1/completions", content=big, headers={"content-type": "application/json"})
    assert announced.status_code == 413
    error = announced.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
    assert "4 MiB" in error["message"]

    def pieces():  # no Content-Length: sent chunked, counted as it arrives
        for start in range(0, len(big), MIB):
            yield big[start : start + MIB]

    chunked = httpx.post(f"{url}/v1/chat/completions", content=pieces(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", "4"), ("stream", "yes"), ("temperature", "0.5"), ("seed", 1.5), ("ignore_eos", 1)],
)
def test_lax_types_are_refused_as_openai_refuses_them(url, field, value):
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 2, field: value}
    answer = httpx.post(f"{url}/v1/completions", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field


def test_a_body_that_is_not_declared_json_is_400_naming_the_content_type(url):
    body = json.dumps({"model": MODEL_ID, "prompt": "x", "max_tokens": 2})
    answer = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "text/plain"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and "application/json" in error["message"]
    charset = httpx.post(
        f"{url}/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert charset.status_code == 200


@pytest.fixture
def encodes(deployment, monkeypatch):
    """Record the length of every text the server's tokenizer encodes (the real tokenizer does the work)."""
    tokenizer = deployment[1].engine.tokenizer
    seen: list[int] = []
    real = tokenizer.encode

    def encode(text, *args, **kwargs):
        seen.append(len(text))
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    return seen


def test_a_prompt_that_cannot_fit_is_refused_without_tokenising(client, encodes):
    prompt = "word " * (MIB // 5)  # 1 MiB of text: far more than MAX_MODEL_LEN tokens, however long a token is
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4)
    assert err.value.code == "context_length_exceeded" and f"max_model_len={MAX_MODEL_LEN}" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}])
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=[7] * (MAX_MODEL_LEN + 1), max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    assert encodes == []  # none of the three reached the tokenizer


def test_a_prompt_being_tokenised_does_not_stall_another_request(client, deployment, monkeypatch):
    """The large request's tokenising is held (a tokenizer that waits on an event for long texts): the small request
    must be served meanwhile, so tokenising cannot be on the event loop or the engine's step loop."""
    tokenizer = deployment[1].engine.tokenizer
    real, held, release = tokenizer.encode, threading.Event(), threading.Event()

    def encode(text, *args, **kwargs):
        if len(text) > 400:
            held.set()
            release.wait(DRAIN_TIMEOUT_S)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    quick = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=DRAIN_TIMEOUT_S / 2)
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(client.completions.create, model=MODEL_ID, prompt="long " * 100, max_tokens=2)
        try:
            assert held.wait(DRAIN_TIMEOUT_S), "the large prompt never reached the tokenizer"
            small = quick.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2, extra_body=NO_EOS)
            assert small.usage.completion_tokens == 2
            assert not large.done()  # the small one finished while the large one was still being tokenised
        finally:
            release.set()
        assert large.result().usage.prompt_tokens > 100


# ---- detokenising off the engine's step loop (issue 15, point 2) ------------------------------------------------


@pytest.fixture
def decode_threads(deployment, monkeypatch):
    """Record the name of the thread of every call of the server tokenizer's decode (the real decode does the work)."""
    tokenizer = deployment[1].engine.tokenizer
    names: list[str] = []
    real = tokenizer.decode

    def decode(ids, *args, **kwargs):
        names.append(threading.current_thread().name)
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", decode)
    return names


@pytest.mark.parametrize("stop", [None, ["e", "th"]], ids=["no-stop", "stop-strings"])
def test_the_text_is_never_decoded_on_the_engine_step_loop(client, deployment, decode_threads, stop):
    base = dict(model=MODEL_ID, temperature=0, max_tokens=12, stop=stop, extra_body=NO_EOS)
    messages = [{"role": "user", "content": "Tell me a story"}]
    answers = [
        client.completions.create(prompt="Once upon a time", **base).choices[0],
        client.chat.completions.create(messages=messages, **base).choices[0],
    ]
    streams = [
        list(client.completions.create(prompt="Once upon a time", stream=True, **base)),
        list(client.chat.completions.create(messages=messages, stream=True, **base)),
    ]
    texts = [answers[0].text, answers[1].message.content]
    assert texts[0] == "".join(c.choices[0].text for c in streams[0])
    assert texts[1] == "".join(c.choices[0].delta.content or "" for c in streams[1] if c.choices)
    assert any(texts), "no text came back: nothing was decoded"
    if stop:
        assert all(s not in text for s in stop for text in texts)
    engine_thread = deployment[1]._thread.name
    assert decode_threads and engine_thread not in decode_threads, set(decode_threads)


def first_completing(tokenizer: Tokenizer, token_ids: list[int], stop: str) -> int:
    """Return how many of `token_ids` it takes for their text to contain `stop`."""
    return next(n for n in range(1, len(token_ids) + 1) if stop in tokenizer.decode(token_ids[:n]))


def test_a_stop_string_aborts_the_request_frees_its_blocks_and_counts_tokens_up_to_it(deployment):
    """The consumer lags behind the engine, which runs past the stop string meanwhile: those tokens are dropped,
    usage counts the tokens up to the one that completed the stop string, and the request's KV blocks are freed."""
    _, engine, runner = deployment
    tokenizer = engine.engine.tokenizer
    prompt = tokenizer.encode("In the beginning", add_bos=True)
    max_tokens = MAX_MODEL_LEN - 16

    async def run(params: SamplingParams, request_id: str, lag_steps: int = 0) -> list:
        deltas = []
        async for delta in engine.stream(prompt, params, request_id):
            if not deltas and lag_steps:  # the engine runs on (or finishes) while nobody reads
                target = runner.steps + lag_steps
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while runner.steps < target and engine.engine.has_work() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            deltas.append(delta)
        return deltas

    whole = asyncio.run(run(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), "stop-whole"))
    ids, text = [t for d in whole for t in d.token_ids], "".join(d.text for d in whole)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3, text
    n = first_completing(tokenizer, ids, stop)
    wait_idle(engine)
    steps_before = runner.steps
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, stop=[stop])
    cut = asyncio.run(run(params, "stop-cut", lag_steps=n + 4))
    last = cut[-1]
    assert last.finish_reason == "stop" and "".join(d.text for d in cut) == text[: text.index(stop)]
    assert last.completion_tokens == n and [t for d in cut for t in d.token_ids] == ids[:n]
    wait_idle(engine)  # no request left, every KV block free
    assert runner.steps - steps_before > n + 1  # the engine computed tokens past the stop string: they were dropped
    assert runner.steps - steps_before < max_tokens // 2  # aborted at the stop string, not run to max_tokens


def test_offline_generate_stops_at_a_stop_string_with_the_same_result(deployment):
    model, tokenizer = deployment[2].runner.model, deployment[1].engine.tokenizer
    engine = LLMEngine(ModelRunner(model, CONFIG), tokenizer, CONFIG)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    [whole] = engine.generate(["In the beginning"], free)
    stop = whole.text[len(whole.text) // 2 : len(whole.text) // 2 + 3]
    n = first_completing(tokenizer, whole.token_ids, stop)
    [cut] = engine.generate(["In the beginning"], free.model_copy(update={"stop": [stop], "max_tokens": 200}))
    assert cut.finish_reason == "stop" and cut.text == whole.text[: whole.text.index(stop)]
    assert cut.token_ids == whole.token_ids[:n] and cut.completion_tokens == n
    assert not engine.has_work() and engine.scheduler.block_manager.num_free_blocks == CONFIG.num_kv_blocks
