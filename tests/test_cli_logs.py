"""`matrixstack logs NAME`: the last lines of a deployment's engine log in the data dir (where the local site writes
it: tests/test_stack_local_site.py runs a real engine into it), `--follow` printing what is appended until Ctrl-C,
and exit 2 naming the problem for an unknown deployment or one that has not run here yet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from matrixstack.stack.local_site import engine_log_path

FOLLOW_TIMEOUT_S = 60.0


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_log(name: str, text: str) -> None:
    path = engine_log_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_logs_prints_the_last_lines(cli, home):
    write_log("lane", "".join(f"line {i}\n" for i in range(100)))
    result = cli("logs", "lane", "-n", "3")
    assert result.exit_code == 0 and result.output == "line 97\nline 98\nline 99\n"
    assert cli("logs", "lane").output.splitlines() == [f"line {i}" for i in range(50, 100)]  # 50 by default


def test_logs_of_an_unknown_or_never_run_deployment_exit_2(cli, home, tmp_path):
    db = f"sqlite:///{tmp_path / 'state.db'}"
    result = cli("logs", "ghost", "--db", db)
    assert result.exit_code == 2 and "no deployment 'ghost'" in result.output and "deployment list" in result.output
    added = cli("deployment", "add", "waiting", "--kind", "vllm", "--url", "http://127.0.0.1:9/v1", "--db", db)
    assert added.exit_code == 0, added.output
    result = cli("logs", "waiting", "--db", db)
    assert result.exit_code == 2 and "deployment waiting has no log yet" in " ".join(result.output.split())


@pytest.mark.slow
def test_logs_follow_prints_what_is_appended_until_ctrl_c(home):
    write_log("lane", "first\n")
    cmd = [sys.executable, "-c", "from matrixstack.cli.main import app; app()", "logs", "lane", "--follow"]
    follower = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert follower.stdout.readline() == "first\n"
        with open(engine_log_path("lane"), "a") as log:
            log.write("appended after\n")
        assert follower.stdout.readline() == "appended after\n"
        write_log("lane", "a new start\n")  # replaced (shorter): read from its beginning
        assert follower.stdout.readline() == "a new start\n"
        time.sleep(0.1)
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=FOLLOW_TIMEOUT_S) == 0
    finally:
        follower.kill()
        follower.wait()
