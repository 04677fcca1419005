"""`portal serve` as a user runs it: a second process on a free port, JSON request lines on stdout, Ctrl-C stops it.

`cli/main.py` wires the `portal` group in; this test runs the group itself (`portal_serve_cmd.portal_app`), so it
does not depend on that wiring.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from matrixstack.cli.portal_serve_cmd import portal_app
from matrixstack.portal.gateway import UNKNOWN_ENTRY
from matrixstack.portal.key_service import create_key
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import usage_report

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@pytest.mark.slow
def test_portal_serve_runs_logs_json_and_stops_on_ctrl_c(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'portal.db'}"
    with open_portal_database(db_url) as svc:
        _, key = svc.write(lambda session: create_key(session, "acme"))
    cmd = [sys.executable, "-c", "from matrixstack.cli.portal_serve_cmd import portal_app; portal_app()"]
    cmd += ["serve", "--db", db_url, "--port", "0", "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        url, seen = None, []
        while url is None:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                pytest.fail("portal serve exited:\n" + "".join(seen))
            seen.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line):
                url = match.group(1)
            assert time.monotonic() < deadline, "portal serve did not start:\n" + "".join(seen)
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "portal serve did not come up"
            time.sleep(0.1)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
    line = json.loads(out.strip().splitlines()[-1])  # stdout carries only the request log
    assert line["tenant"] == "acme" and line["entry"] == "nope" and line["status"] == 404
    with open_portal_database(db_url) as svc:  # the writer wrote its last batch on the way out
        assert svc.read(lambda session: usage_report(session, group_by=("entry",))) == [
            {
                "entry": UNKNOWN_ENTRY,
                "requests": 1,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "errors": 1,
            }  # an unknown name is stored in the one unknown bucket, never verbatim
        ]


def test_portal_serve_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            portal_app, ["serve", "--db", f"sqlite:///{tmp_path / 'p.db'}", "--port", str(port)]
        )
    assert result.exit_code == 2 and "--port" in result.output
