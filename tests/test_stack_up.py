"""`matrixstack up` as a user runs it: a subprocess with the embedded default shape, the data directory in a tmp
folder and `--port 0`. The first run prints the keys once, serves the L2 and the L0 through the `openai` client,
and its "try next" commands work as printed; Ctrl-C (SIGINT) exits 0 and leaves no engine or EP worker behind. A
second run on the same data directory prints no key, takes the old one, still holds the first run's usage, and
stops as cleanly on SIGTERM.
A bad shape path, a site `up` cannot run and a taken port are exit code 2 with a message."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import usage_report
from matrixstack.procs import proc_stat
from matrixstack.stack.supervise import group_alive
from matrixstack.stack.up import READY_LINE

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
KEY_LINE = re.compile(r"new key for tenant (\S+) \(([^,)]+)(, admin)?\): (sk-\S+)  shown once: store it")
PORTAL_LINE = re.compile(r"portal: (http://127\.0\.0\.1:\d+/v1)")
L2, L0 = "tiny-moe-faq", "tiny-moe"
EP_WORKERS = 2  # the default shape pins decode.ep: 2


def processes() -> dict[int, tuple[int, int, str]]:
    """Return pid -> (parent pid, process group id, state) of every process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None:
            state, ppid, pgrp = fields[:3]
            found[int(entry.name)] = (int(ppid), int(pgrp), state)
    return found


def engines_of(pid: int) -> list[int]:
    """Return the engines `up` (process `pid`) runs: its live children that lead a process group of their own (a
    site starts each engine in a session of its own; the portal's body pool children share `up`'s group)."""
    return [p for p, (ppid, pgrp, state) in processes().items() if ppid == pid and pgrp == p and state != "Z"]


def zombies_of(pid: int) -> list[int]:
    """Return the zombie children of `pid` (processes that died and nobody reaped)."""
    return [p for p, (ppid, _, state) in processes().items() if ppid == pid and state == "Z"]


class UpRun:
    """One `matrixstack up [SHAPE] --port 0 [ARGS]` subprocess (SHAPE None: the embedded default; `env`: variables
    added to this process's environment): its output up to the ready line, parsed, and a way to stop it."""

    def __init__(
        self,
        home: Path,
        run: int,
        shape: Path | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.stderr_path = home / f"up-{run}.stderr"
        cmd = [sys.executable, "-c", "from matrixstack.cli.main import app; app()", "up", "--port", "0", *args]
        cmd += [str(shape)] if shape is not None else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.monotonic() + start_timeout_s
        while READY_LINE not in self.lines:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                pytest.fail(f"matrixstack up exited with {self.process.returncode}:\n{self.output()}")
            self.lines.append(line.rstrip("\n"))
            assert time.monotonic() < deadline, f"matrixstack up did not get ready:\n{self.output()}"
        self._drain = threading.Thread(target=self._read_rest, daemon=True)  # the request log must not fill the pipe
        self._drain.start()
        self.keys = {m.group(1): m.group(4) for m in map(KEY_LINE.search, self.lines) if m}
        self.admin_keys = [m.group(4) for m in map(KEY_LINE.search, self.lines) if m and m.group(3)]
        self.base_url = next(m.group(1) for m in map(PORTAL_LINE.search, self.lines) if m)
        start = next(i for i, line in enumerate(self.lines) if line.startswith("try next"))
        self.try_next = "\n".join(self.lines[start + 1 : self.lines.index(READY_LINE)])
        self.engine_pids = engines_of(self.process.pid)

    def _read_rest(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr_path.read_text(errors="replace")

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0)

    def interrupt(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Send `sig` (SIGINT: Ctrl-C) and return the exit code (idempotent)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        self._drain.join(timeout=STOP_TIMEOUT_S)
        return code


def chat(client: openai.OpenAI, model: str):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )


def run_try_next(block: str, **env: str) -> subprocess.CompletedProcess:
    """Run the printed "try next" commands in bash as a user would paste them."""
    return subprocess.run(["bash", "-e", "-c", block], capture_output=True, text=True, env={**os.environ, **env})


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("home")
        mp.setenv("MATRIXSTACK_HOME", str(path))
        mp.delenv("MATRIXSTACK_DB", raising=False)
        yield path


@pytest.fixture(scope="module")
def first(home):
    run = UpRun(home, 1)
    yield run
    run.interrupt()


def test_first_run_prints_keys_once_and_serves_the_catalog(first):
    assert set(first.keys) == {"default", "admin"}, first.output()
    assert first.admin_keys == [first.keys["admin"]]
    root = first.base_url.removesuffix("/v1")
    assert f"dashboard: {root}/dashboard#key={first.keys['admin']}" in first.lines
    assert any(
        line.startswith(f"deployment {L0}: EP{EP_WORKERS} on 2 devices, engine at http://") for line in first.lines
    )
    client = first.client(first.keys["default"])
    for model in (L2, L0):
        reply = chat(client, model)
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


def test_try_next_commands_work_as_printed(first):
    assert f'-H "Authorization: Bearer {first.keys["default"]}"' in first.try_next
    done = run_try_next(first.try_next)
    assert done.returncode == 0, done.stderr
    assert '"object":"chat.completion"' in done.stdout.replace(" ", ""), done.stdout


def test_engine_runs_with_its_ep_workers_and_sigint_stops_everything(first):
    assert len(first.engine_pids) == 1, first.output()  # one deployment: one engine process, in its own group
    engine = first.engine_pids[0]
    group = [pid for pid, (_, pgrp, state) in processes().items() if pgrp == engine and state != "Z"]
    workers = [pid for pid in group if pid != engine and processes().get(pid, (0,))[0] != engine]
    assert len(workers) >= EP_WORKERS, group  # the EP workers are forked by the forkserver, not the engine
    assert first.interrupt() == 0, first.output()
    assert first.lines[-1] == "stopped"
    assert not group_alive(engine)
    assert not [pid for pid in group if pid in processes() and processes()[pid][2] != "Z"]


def test_restart_keeps_keys_catalog_and_usage(first, home):
    if first.process.poll() is None:  # run on its own: give the first run the usage the tests above give it
        for model in (L2, L0):
            chat(first.client(first.keys["default"]), model)
    assert first.interrupt() == 0
    before = open_portal_database(None).read(lambda session: usage_report(session, ["tenant"]))
    used = {row["tenant"]: row["requests"] for row in before}
    assert used.get("default", 0) >= 2, before  # the L2 and L0 calls of the first run
    second = UpRun(home, 2)
    try:
        assert second.keys == {}, second.output()
        assert "$MATRIXSTACK_API_KEY" in second.try_next
        reply = chat(second.client(first.keys["default"]), L2)
        assert reply.usage.completion_tokens > 0
        done = run_try_next(second.try_next, MATRIXSTACK_API_KEY=first.keys["default"])
        assert done.returncode == 0, done.stderr
    finally:
        assert second.interrupt(signal.SIGTERM) == 0, second.output()
        assert second.lines[-1] == "stopped" and not group_alive(second.engine_pids[0])
    after = {
        row["tenant"]: row["requests"]
        for row in open_portal_database(None).read(lambda session: usage_report(session, ["tenant"]))
    }
    assert after["default"] >= used["default"] + 3  # the first run's usage plus this run's chat, curl and openai


def test_user_errors_exit_2(cli, home, tmp_path):
    missing = tmp_path / "no-such-shape.yaml"
    result = cli("up", str(missing))
    assert result.exit_code == 2 and "no-such-shape.yaml" in result.output, result.output
    result = cli("up", "--site", "k8s")
    assert result.exit_code == 2 and "local or ray" in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("up", "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 2 and "cannot listen" in result.output, result.output


def test_a_shape_the_sites_cannot_run_is_refused_before_anything_is_applied(cli, tmp_path):
    db = tmp_path / "state.db"
    examples = Path(__file__).resolve().parents[1] / "examples" / "shapes"
    result = cli("up", str(examples / "hybrid" / "on-prem.yaml"), "--db", f"sqlite:///{db}", "--port", "0")
    assert result.exit_code == 2 and "asks for ascend" in result.output and "stack render k8s" in result.output
    assert "new key" not in result.output
    export = cli("shape", "export", "--db", f"sqlite:///{db}")
    assert export.exit_code == 2, export.output  # nothing was applied: there is no shape to export


def test_a_vllm_deployment_without_its_folder_here_is_refused_before_anything_is_applied(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'state.db'}"
    shape = tmp_path / "lane.yaml"
    shape.write_text(
        "name: lane\nfabric: local\n"
        "deployments:\n"
        f"  - {{name: lane, arch: tiny-moe, weights: {tmp_path / 'nothing'}, engine: vllm, slice: {{devices: 1}}}}\n"
        "catalog:\n"
        "  - {name: lane, level: L0, provider: first-party, backend: {kind: vllm, deployment: lane}}\n"
        "tenants:\n  - {name: default, keys: [{name: default}]}\n"
    )
    result = cli("up", str(shape), "--db", db, "--port", "0")
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "deployment lane: weights:" in output, result.output
    assert "is not a Hugging Face folder on this machine (no config.json)" in output and "model export" in output
    assert "new key" not in result.output
    assert cli("shape", "export", "--db", db).exit_code == 2  # nothing was applied
