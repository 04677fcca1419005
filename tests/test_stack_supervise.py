"""The supervisor (`stack.supervise`) with real child processes: a small HTTP server stands in for an engine (it
answers /health as an engine does and starts in milliseconds, so the supervision is what is tested). Checked: a
process that keeps failing to start is given up on after `max_failed_starts` (status `failed`, a line in its log
that `matrixstack logs` shows, the reason from the process's own output), leaving no zombie; a process that stops
answering /health (SIGSTOP: hung, not dead) is killed and started again; and a supervised process, with what it
started in its group, dies with the process that started it, even when the thread that started it has ended (a
restart's thread)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_stack_up import zombies_of

from matrixstack.stack.local_site import engine_log_path
from matrixstack.stack.site import STATUS_FAILED, STATUS_RESTARTING, STATUS_RUNNING
from matrixstack.stack.supervise import Backoff, SupervisedProcess, group_alive, group_members

pytestmark = pytest.mark.slow

TOLD_TIMEOUT_S = 60.0  # a failure guard for each status change, never a timing assertion
FAST = Backoff(first_s=0.05, max_s=0.2, healthy_reset_s=60.0)
HEALTH_SERVER = textwrap.dedent(
    """
    import http.server, sys
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b'{"status": "ok"}')
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
    """
)
CANNOT_START = "import sys; print('error: the weights folder /nowhere does not exist'); sys.exit(2)"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path))
    (tmp_path / "logs").mkdir()
    return tmp_path


def health_server(port: int) -> list[str]:
    return [sys.executable, "-c", HEALTH_SERVER, str(port)]


def supervised(name: str, command, told: queue.Queue, **options) -> SupervisedProcess:
    process = SupervisedProcess(
        name, command, dict(os.environ), engine_log_path(name), on_status=lambda *c: told.put(c), **options
    )
    process.spawn()
    process.wait_ready(TOLD_TIMEOUT_S)
    process.watch()
    return process


def test_gives_up_after_n_failed_starts_says_why_and_leaves_no_zombie(home, cli):
    starts: list[int] = []

    def command(port: int) -> list[str]:
        starts.append(port)
        return health_server(port) if len(starts) == 1 else [sys.executable, "-c", CANNOT_START]

    told: queue.Queue = queue.Queue()
    process = supervised("doomed", command, told, backoff=FAST, max_failed_starts=3)
    try:
        first = process.pid
        os.kill(first, signal.SIGKILL)
        assert told.get(timeout=TOLD_TIMEOUT_S)[:2] == ("doomed", STATUS_RESTARTING)
        assert told.get(timeout=TOLD_TIMEOUT_S)[:2] == ("doomed", STATUS_FAILED)
        assert len(starts) == 1 + 3
        assert not group_alive(first) and zombies_of(os.getpid()) == []
        shown = cli("logs", "doomed", "-n", "5")
        assert shown.exit_code == 0
        assert "gave up after 3 failed starts in a row" in shown.output
        assert "error: the weights folder /nowhere does not exist" in shown.output
    finally:
        process.stop()
    assert told.empty()


def test_a_hung_process_that_stops_answering_health_is_restarted(home):
    told: queue.Queue = queue.Queue()
    process = supervised("hung", health_server, told, backoff=FAST, probe_interval_s=0.2, probe_failures=3)
    try:
        first = process.pid
        os.kill(first, signal.SIGSTOP)  # alive, but answers nothing
        assert told.get(timeout=TOLD_TIMEOUT_S)[:2] == ("hung", STATUS_RESTARTING)
        assert told.get(timeout=TOLD_TIMEOUT_S)[:2] == ("hung", STATUS_RUNNING)
        assert process.pid != first and not group_alive(first)
        assert "stopped answering /health" in engine_log_path("hung").read_text()
    finally:
        process.stop()


def test_a_supervised_process_and_its_group_die_with_its_parent(home, tmp_path):
    """A parent that spawns from a thread that then ends (as a restart does), then is killed with SIGKILL: its
    supervised process is gone too, with the process that one started in its group (as vLLM's API server starts
    its engine core, which does not die with the server), and all were alive while the parent lived."""
    program = textwrap.dedent(
        f"""
        import os, sys, threading, time
        from matrixstack.stack.supervise import SupervisedProcess
        SERVER = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        SERVER += {HEALTH_SERVER!r}
        p = SupervisedProcess("orphan", lambda port: [sys.executable, "-c", SERVER, str(port)],
                              dict(os.environ), __import__("pathlib").Path(sys.argv[1]))
        t = threading.Thread(target=p.spawn); t.start(); t.join()
        p.wait_ready(60)
        print(p.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", program, str(tmp_path / "orphan.log")], stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        child = int(parent.stdout.readline())
        assert len(group_members(child)) == 2  # the thread that started it has ended; both live with the parent
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + TOLD_TIMEOUT_S
        while group_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and group_alive(child):
            os.killpg(child, signal.SIGKILL)
