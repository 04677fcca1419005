"""The vLLM lane: `vllm serve` command lines built from perf plans (pure), and a real launch where vLLM is installed
and `MATRIXSTACK_VLLM_MODEL` names a model for it.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from matrixstack.errors import UserError
from matrixstack.lanes.vllm import VllmLauncher, vllm_available
from matrixstack.openai.endpoints import COMPLETION
from matrixstack.perf.spec import InstancePlan

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
            engine = launcher.client()
            try:
                assert await engine.model_ids() == ["m"]
                out = await engine.send(COMPLETION, {"model": "m", "prompt": "Hello", "max_tokens": 4})
                assert out["usage"]["completion_tokens"] >= 1
            finally:
                await engine.aclose()

        asyncio.run(check())
    assert launcher.process is None
