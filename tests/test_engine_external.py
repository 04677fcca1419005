"""Other engines: the external OpenAI-compatible client against a real engine server process, and vLLM's launcher.

The upstream is `matrixstack engine serve tiny-moe --random-weights --port 0` in a second process (as a user
would run it); the module stops it with SIGINT (Ctrl-C) and checks it exits cleanly. The vLLM launch test runs
only where vLLM is installed and `MATRIXSTACK_VLLM_MODEL` names a model for it.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from matrixstack.engine.external import ExternalEngine, UpstreamError, VllmLauncher, vllm_available
from matrixstack.errors import UserError
from matrixstack.perf.spec import InstancePlan

MODEL_ID = "tiny-moe"
STOP_TIMEOUT_S = 30.0
NO_EOS = {"ignore_eos": True}


# ---- vLLM command lines (pure) ----------------------------------------------------------------------------------


def args_after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_vllm_command_from_expert_parallel_plan():
    plan = InstancePlan(devices=16, tp=2, ep=16, batch_per_device=64)  # dp = 16 / 2 = 8, ep = tp x dp
    launcher = VllmLauncher.from_plan("/models/dsv3", plan, port=9001, extra_args=["--max-model-len", "4096"])
    cmd = launcher.command()
    assert cmd[cmd.index("serve") + 1] == "/models/dsv3"
    assert args_after(cmd, "--tensor-parallel-size") == "2"
    assert args_after(cmd, "--data-parallel-size") == "8"
    assert "--enable-expert-parallel" in cmd and "--pipeline-parallel-size" not in cmd
    assert args_after(cmd, "--port") == "9001" and args_after(cmd, "--host") == "127.0.0.1"
    assert cmd[-2:] == ["--max-model-len", "4096"]
    assert launcher.base_url == "http://127.0.0.1:9001/v1"


def test_vllm_command_from_dense_plan_and_dies():
    plan = InstancePlan(devices=4, tp=4, pp=2, ep=1, batch_per_device=8)  # 2 dies per device: 8 ranks = tp4 x pp2
    cmd = VllmLauncher.from_plan("m", plan, dies_per_device=2, served_model_name="llama").command()
    assert args_after(cmd, "--tensor-parallel-size") == "4"
    assert args_after(cmd, "--pipeline-parallel-size") == "2"
    assert "--data-parallel-size" not in cmd and "--enable-expert-parallel" not in cmd
    assert args_after(cmd, "--served-model-name") == "llama"


def test_vllm_plan_vllm_cannot_run_is_refused():
    with pytest.raises(UserError, match="ep=8"):
        VllmLauncher.from_plan("m", InstancePlan(devices=16, tp=2, ep=8, batch_per_device=1))
    with pytest.raises(UserError, match="tensor_parallel_size"):
        VllmLauncher("m", tensor_parallel_size=0)


def test_vllm_direct_arguments():
    cmd = VllmLauncher("m", 8, True, 8100, ["--trust-remote-code"]).command()
    assert args_after(cmd, "--tensor-parallel-size") == "8" and "--enable-expert-parallel" in cmd
    assert cmd[-1] == "--trust-remote-code" and args_after(cmd, "--port") == "8100"


VLLM_MODEL = os.environ.get("MATRIXSTACK_VLLM_MODEL")
VLLM_SKIP = (
    "vLLM is not installed here (no `vllm` command or package)"
    if not vllm_available()
    else "set MATRIXSTACK_VLLM_MODEL to a model vLLM can load on this machine"
    if not VLLM_MODEL
    else ""
)


@pytest.mark.slow
@pytest.mark.skipif(bool(VLLM_SKIP), reason=VLLM_SKIP)
def test_vllm_launch_serves_and_stops():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = VllmLauncher(VLLM_MODEL, port=port, served_model_name="m")
    with launcher:

        async def check() -> None:
            async with launcher.client() as engine:
                assert await engine.model_ids() == ["m"]
                out = await engine.complete({"model": "m", "prompt": "Hello", "max_tokens": 4})
                assert out["usage"]["completion_tokens"] >= 1

        asyncio.run(check())
    assert launcher.process is None


# ---- the external client against a real engine server process ------------------------------------------------


@pytest.fixture(scope="module")
def upstream(engine_process):
    """Start `matrixstack engine serve` on a free port in a second process; yield (process, base URL)."""
    return engine_process(
        *["--max-model-len", "128", "--num-kv-blocks", "16", "--max-num-seqs", "4", "--max-num-batched-tokens", "128"]
    )


def run(coro):
    return asyncio.run(coro)


def test_external_engine_against_engine_server(upstream):
    _, base_url = upstream

    async def scenario() -> None:
        async with ExternalEngine(base_url, api_key="secret") as engine:
            assert await engine.model_ids() == [MODEL_ID]
            body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 5, "temperature": 0, **NO_EOS}
            whole = await engine.complete(body)
            assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 5
            chunks = [c async for c in engine.stream_complete({**body, "stream_options": {"include_usage": True}})]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
            assert chunks[-1]["usage"]["completion_tokens"] == 5

            chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **NO_EOS}
            reply = await engine.chat({**chat, "temperature": 0})
            assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] == 4
            streamed = [c async for c in engine.stream_chat({**chat, "temperature": 0})]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed)
            assert text == reply["choices"][0]["message"]["content"]

    run(scenario())


def test_external_engine_passes_openai_errors_through(upstream):
    _, base_url = upstream

    async def scenario() -> None:
        async with ExternalEngine(base_url) as engine:
            with pytest.raises(UpstreamError) as err:
                await engine.complete({"model": "nope", "prompt": "x"})
            assert err.value.status_code == 404 and err.value.code == "model_not_found"
            assert set(err.value.body["error"]) == {"message", "type", "param", "code"}
            with pytest.raises(UpstreamError) as err:
                await engine.chat({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "n": 2})
            assert err.value.status_code == 400 and err.value.param == "n"
            with pytest.raises(UpstreamError) as err:
                async for _ in engine.stream_complete({"model": MODEL_ID, "prompt": "x", "temperature": -1}):
                    pass
            assert err.value.status_code == 400 and err.value.param == "temperature"

    run(scenario())


def test_external_engine_unreachable_is_502():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> None:
        async with ExternalEngine(f"http://127.0.0.1:{port}/v1") as engine:
            assert not await engine.health()
            with pytest.raises(UpstreamError) as err:
                await engine.models()
            assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"

    run(scenario())
    with pytest.raises(UserError, match="http"):
        ExternalEngine("127.0.0.1:8000")


def test_engine_serve_stops_cleanly_on_ctrl_c(upstream):  # last: it stops the module's upstream
    process, _ = upstream
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    assert process.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out
