"""bench/soak.py still runs: a short soak (12 s of load, an EP worker killed every 5 s) writes a report with every
figure, the kills it made, and leaves no process behind. No figure's size is asserted: the bench measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_reliability_faults import RUN_MARKER, kill_all, marked

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
SOAK_TIMEOUT_S = 600.0


def test_a_short_soak_reports_requests_errors_latency_kills_and_rss(tmp_path):
    out = tmp_path / "soak.json"
    marker = uuid.uuid4().hex  # carried by every process the soak starts
    cmd = [sys.executable, str(SOAK), "--minutes", "0.2", "--kill-every-s", "5", "--clients", "2", "--json", str(out)]
    env = {**os.environ, RUN_MARKER: marker}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S, env=env)
    finally:
        left = marked(marker)
        kill_all(left)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["bench"] == "soak" and report["minutes"] == 0.2
    assert report["requests"] == report["completed"] + report["failed"] > 0
    assert sum(report["errors_by_cause"].values()) == report["failed"]
    latency = report["latency_ms"]["all"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert len(report["kills"]) == 2 and all(k["what"] == "worker" and k["pid"] for k in report["kills"])
    for name in ("portal", "engine"):
        rss = report["rss"][name]
        assert rss["start_mib"] > 0 and rss["growth_mib"] == pytest.approx(rss["end_mib"] - rss["start_mib"], abs=0.2)
    assert "soak:" in done.stderr and "requests" in done.stderr  # the summary
    assert not left, "the soak left processes running"
