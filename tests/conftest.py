"""Shared test fixtures: the CLI runner, a way to invoke `matrixstack` as a user would, engine server processes to
stand behind clients, and the stores' databases (SQLite, or PostgreSQL on one throwaway server for the session when
`initdb` and `pg_ctl` are found, on PATH or in Debian's /usr/lib/postgresql/*/bin), and transformers' side of the
tests that compare the engine with it (`hf_reference`: tests/hf_reference.py in vLLM's venv). And the `slow` tier:
every test that starts a process or a server is marked `slow` here or at its definition, so `make test-fast`
(`pytest -m "not slow"`) runs the in-process tests only."""

from __future__ import annotations

import asyncio
import base64
import glob
import itertools
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from matrixstack.cli.main import app
from matrixstack.lanes.vllm_env import installed_vllm, missing_vllm_message, vllm_python, vllm_venv
from matrixstack.openai.httpx_client import HttpxClient

ENGINE_START_TIMEOUT_S = 120.0
HF_REFERENCE_SCRIPT = Path(__file__).parent / "hf_reference.py"
HF_REFERENCE_TIMEOUT_S = 600.0

# Marked `slow` here: the tests of these files (each runs subprocesses), the tests using a fixture that starts a
# process or a server (engine_process for any file; the others for their own file's tests), and the tests on the
# PostgreSQL server. Tests that start one themselves carry `@pytest.mark.slow`.
SLOW_FILES = frozenset({"test_readme_walkthroughs.py"})
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


@pytest.fixture(scope="session", autouse=True)
def _throwaway_data_key():
    """Seal the secrets tests store with a throwaway data key ($MATRIXSTACK_SECRET_KEY, which the processes tests
    start inherit), never with the key file of the user's data directory; a test may unset it to use a key file of
    its own data directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIXSTACK_SECRET_KEY", base64.urlsafe_b64encode(os.urandom(32)).decode())
        yield


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


@pytest.fixture(scope="session")
def installed_vllm_venv() -> Path:
    """Return the folder of vLLM's installed venv. Skips the test when it is not installed, except in CI
    (`CI=true`, where `.ci/run` installs it), where the test fails saying how to install it. Session scoped, so the
    venv is found before a test's fixtures point MATRIXSTACK_HOME (the data dir) elsewhere."""
    venv = vllm_venv()
    if installed_vllm(venv) is None:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(missing_vllm_message(venv))
    return venv


@pytest.fixture(scope="session")
def hf_reference(installed_vllm_venv):
    """Return a function that runs tests/hf_reference.py with a request (a dict; see that script) in vLLM's venv,
    which has transformers, and returns the JSON it prints last (None when it prints none)."""

    def run(request: dict):
        cmd = [str(vllm_python(installed_vllm_venv)), str(HF_REFERENCE_SCRIPT), json.dumps(request)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=HF_REFERENCE_TIMEOUT_S)
        assert done.returncode == 0, f"{HF_REFERENCE_SCRIPT.name} failed:\n{done.stdout}{done.stderr}"
        lines = done.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else None

    return run


# ---- a throwaway PostgreSQL server -----------------------------------------------------------------------------

_database_numbers = itertools.count()


def _postgres_bin() -> Path | None:
    """Return the folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """Start a throwaway PostgreSQL server, one for the session (each test gets its own database from db_url);
    yield its base URL; stop it and delete its files."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin)")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="matrixstack-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root needs a 'postgres' user to start PostgreSQL (Debian's package makes one)")
        if shutil.which("runuser") is None:
            shutil.rmtree(base)
            pytest.skip("running as root needs runuser (util-linux) to start PostgreSQL as the postgres user")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run(
        [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o", options,
         "start"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


def fresh_database_url(request: pytest.FixtureRequest, kind: str, folder: Path) -> str:
    """Return the URL of a fresh, empty database of `kind`: a SQLite file in `folder` ("sqlite"), or a new database
    on the session's PostgreSQL server ("postgresql"; skips the test where it cannot run)."""
    if kind == "sqlite":
        return f"sqlite:///{folder / 'matrix.db'}"
    import psycopg

    base = request.getfixturevalue("postgres_server")
    name = f"matrix_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(base.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Return the URL of a fresh, empty database: a SQLite file, or a new database on the PostgreSQL server."""
    return fresh_database_url(request, request.param, tmp_path)
