"""Nothing `matrixstack up` starts outlives it, nothing it starts is an open door, and a dead engine comes back.

`up` runs as a user runs it (a subprocess, the data directory in a tmp folder, `--port 0`) with the embedded default
shape: tiny-moe with two expert-parallel workers, whose engine's process group holds the engine, its forkserver and
the workers. Its engine refuses every /v1 call without the deployment's secret (401 in OpenAI's format; /health
stays open), while the portal, which holds the secret, serves through it. `kill -9` of the engine's main process:
`up` reaps it (no zombie), the portal answers 503 with Retry-After in OpenAI's format, and serves again once the
engine is back. `kill -9` of `up` takes its engine with it (the parent-death signal), and a second `up` on the same
data directory starts clean and serves. A leftover of an earlier run recorded in the data directory (a process
that survived its `up`) is stopped when the local site starts; a recorded pid that now belongs to another process
(its start time differs) is left alone, and so are the engines of a run whose `up` is still alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_stack_up import EP_WORKERS, UpRun, chat, engines_of

from matrixstack.portal.deployment_service import engine_secret
from matrixstack.procs import start_time
from matrixstack.stack.leftovers import RunRecord, stop_leftovers
from matrixstack.stack.supervise import group_alive, group_members

pytestmark = pytest.mark.slow

GONE_TIMEOUT_S = 60.0  # a failure guard for the engine to go after its `up`, never a timing assertion
L0 = "tiny-moe"


def engine_url(run: UpRun) -> str:
    line = next(line for line in run.lines if line.startswith(f"deployment {L0}:"))
    return line.rsplit("engine at ", 1)[1]


def wait_gone(pgid: int) -> bool:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not group_alive(pgid)


def wait_back(run: UpRun, portal: openai.OpenAI) -> int:
    """Return the pid of `run`'s engine once the portal serves through it again (503 until then)."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        try:
            chat(portal, L0)
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(0.5)
            continue
        return engines_of(run.process.pid)[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path))
    monkeypatch.delenv("MATRIXSTACK_DB", raising=False)
    return tmp_path


def test_engine_needs_its_secret_and_dies_with_up_and_the_next_up_starts_clean(home):
    first = UpRun(home, 1)
    try:
        (engine,) = first.engine_pids
        assert len(group_members(engine)) >= 2 + EP_WORKERS  # the engine, its forkserver and the EP workers
        url = engine_url(first)
        root = url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200  # open: the site's own health check
        for headers in ({}, {"Authorization": "Bearer sk-guess"}):
            answer = httpx.post(f"{url}/chat/completions", json={"model": L0, "messages": []}, headers=headers)
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=url, api_key="sk-guess", max_retries=0), L0)
        direct = openai.OpenAI(base_url=url, api_key=engine_secret(L0), max_retries=0)
        assert chat(direct, L0).usage.completion_tokens > 0  # the secret, derived from the data key, opens it
        portal = first.client(first.keys["default"])
        assert chat(portal, L0).usage.completion_tokens > 0  # the portal holds it
        os.kill(engine, signal.SIGKILL)  # the engine's main process dies; `up` reaps it (no zombie) and restarts it
        assert wait_gone(engine) and not Path(f"/proc/{engine}").exists()
        with pytest.raises(openai.InternalServerError) as down:
            chat(portal, L0)
        assert down.value.status_code == 503 and int(down.value.response.headers["retry-after"]) >= 1
        assert down.value.code == "deployment_not_running"
        engine = wait_back(first, portal)
        first.process.kill()  # kill -9 of `up`: no tear-down runs
        first.process.wait()
        assert wait_gone(engine), f"engine {engine} outlived its up"
    finally:
        first.interrupt()
    second = UpRun(home, 2)
    try:
        assert not second.keys  # the same database: its keys were made by the first run
        assert chat(second.client(first.keys["default"]), L0).usage.completion_tokens > 0
    finally:
        assert second.interrupt() == 0, second.output()


def sleeper() -> subprocess.Popen:
    """Start a process in a session of its own, as a site starts an engine."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)


def test_a_recorded_leftover_is_stopped_and_a_reused_pid_is_not(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_up = int(gone.stdout)  # an `up` killed with SIGKILL: its pid no longer runs
    leftover, stranger, live_up, live_engine = sleeper(), sleeper(), sleeper(), sleeper()
    try:
        record = RunRecord(tmp_path)
        record.save({"a": leftover.pid, "b": stranger.pid}, owner=dead_up)
        recorded = json.loads(record.path.read_text())
        (b,) = [e for e in recorded["engines"] if e["name"] == "b"]
        b["start"] = start_time(stranger.pid) - 1  # recorded for a process that started earlier: a pid reused since
        record.path.write_text(json.dumps(recorded))
        RunRecord(tmp_path).save({"c": live_engine.pid}, owner=live_up.pid)  # another `up`, still running
        assert stop_leftovers(tmp_path) == ["a"]
        assert leftover.wait(timeout=GONE_TIMEOUT_S) == -signal.SIGKILL
        assert stranger.poll() is None and live_engine.poll() is None
        assert not record.path.exists() and len(list(tmp_path.glob("*.json"))) == 1  # the live run's record stays
        live_up.kill()
        live_up.wait()
        assert stop_leftovers(tmp_path) == ["c"]  # its owner gone now: its engine is a leftover
        assert live_engine.wait(timeout=GONE_TIMEOUT_S) == -signal.SIGKILL
        assert stop_leftovers(tmp_path) == [] and list(tmp_path.glob("*.json")) == []
    finally:
        for process in (leftover, stranger, live_up, live_engine):
            process.kill()
            process.wait()
