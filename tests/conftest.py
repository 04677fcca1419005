"""Shared test fixtures: the CLI runner, a way to invoke `matrixstack` as a user would, and engine server
processes to stand behind clients."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from matrixstack.cli.main import app
from matrixstack.openai.httpx_client import HttpxClient

ENGINE_START_TIMEOUT_S = 120.0


@pytest.fixture
def cli():
    """Return a function that runs `matrixstack ARGS...` in-process and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


async def _healthy(base_url: str) -> bool:
    async with HttpxClient(base_url) as engine:
        return await engine.health()


@pytest.fixture(scope="module")
def engine_process():
    """Return a function that starts `matrixstack engine serve tiny-moe --random-weights --port 0` plus the given
    arguments in a second process, waits until it answers, and returns (process, base URL); every process it
    started is killed when the module's tests are done."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[subprocess.Popen, str]:
        cmd = [
            sys.executable,
            "-c",
            "from matrixstack.cli.main import app; app()",
            *["engine", "serve", "tiny-moe", "--random-weights", "--port", "0", "--log-level", "warning", *args],
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        started.append(process)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        lines, base_url = [], None
        while base_url is None:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                pytest.fail("engine serve exited:\n" + "".join(lines))
            lines.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+/v1)", line):
                base_url = match.group(1)
            assert time.monotonic() < deadline, "engine serve did not start:\n" + "".join(lines)
        while not asyncio.run(_healthy(base_url)):  # the URL is printed just before uvicorn starts
            assert process.poll() is None and time.monotonic() < deadline, "engine serve did not come up"
            time.sleep(0.1)
        return process, base_url

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
