"""Shared test fixtures: the CLI runner, a way to invoke `matrixstack` as a user would, and engine server
processes to stand behind clients. And the `slow` tier: every test that starts a process or a server is marked
`slow` here or at its definition, so `make test-fast` (`pytest -m "not slow"`) runs the in-process tests only."""

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
from matrixstack.engine.external import ExternalEngine

ENGINE_START_TIMEOUT_S = 120.0

# Marked `slow` here: the tests of these files (each runs subprocesses), the tests using a fixture that starts a
# process or a server (engine_process for any file; the others for their own file's tests), and the tests on the
# PostgreSQL server. Tests that start one themselves carry `@pytest.mark.slow`.
SLOW_FILES = frozenset({"test_engine_imports.py", "test_readme_walkthroughs.py"})
SLOW_FIXTURES = frozenset({"engine_process"})
SLOW_FIXTURES_OF_FILE = {
    "test_engine_ep.py": {"tiny_ep"},  # expert-parallel worker processes
    "test_engine_server.py": {"deployment"},  # the engine's app on a uvicorn thread
    "test_portal_app_transport.py": {"backend"},  # a backend app on a uvicorn thread
    "test_portal_dashboard.py": {"portal_url"},  # the portal on a uvicorn thread, opened in Chromium
    "test_portal_disconnect.py": {"held"},  # a backend and a portal on uvicorn threads
    "test_stack_local_site.py": {"running"},  # an engine process on a CPU core
    "test_stack_ray.py": {"ray_head"},  # a Ray head node
    "test_stack_up.py": {"first"},  # `matrixstack up` in a subprocess
}


def _starts_a_process_or_server(item: pytest.Item) -> bool:
    """Return whether the test is in SLOW_FILES, uses a fixture of SLOW_FIXTURES(_OF_FILE) or runs on PostgreSQL."""
    name, used = item.path.name, set(item.fixturenames)
    on_postgres = getattr(item, "callspec", None) is not None and item.callspec.params.get("db_url") == "postgresql"
    return name in SLOW_FILES or bool(used & (SLOW_FIXTURES | SLOW_FIXTURES_OF_FILE.get(name, set()))) or on_postgres


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every collected test that starts a process or a server (see SLOW_FILES)."""
    for item in items:
        if _starts_a_process_or_server(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cli():
    """Return a function that runs `matrixstack ARGS...` in-process and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


async def _healthy(base_url: str) -> bool:
    async with ExternalEngine(base_url) as engine:
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
