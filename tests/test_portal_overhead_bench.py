"""bench/portal_overhead.py in a tiny configuration: real processes (the echo upstream, the relay, the portal), real
HTTP.

Only the report's shape and counts are checked (every request served on every path, the portal metered them);
no timing is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "portal_overhead.py"
FIGURES = ("requests", "served", "errors", "latency_ms", "throughput_rps", "wall_s")


def run_bench(tmp_path: Path, *args: str) -> dict:
    """Run the bench with `args` (LiteLLM off, no progress bar), return the JSON of its last line after checking
    that it is the same as the file it wrote."""
    out = tmp_path / "portal_overhead.json"
    command = [sys.executable, str(BENCH), "--json", "--quiet", "--litellm", "off", "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    return report


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_tiny_bench_serves_every_request_on_every_path(tmp_path, client):
    stream = client == "raw"  # the streamed variant once is enough
    args = ["--requests", "40", "--concurrency", "4", "--warmup", "4", "--serial", "5", "--client", client]
    report = run_bench(tmp_path, *args, *([] if stream else ["--no-stream", "--no-plot"]))

    kinds = ("chat", "stream", "serial") if stream else ("chat", "serial")
    for kind in kinds:
        assert set(report[kind]) == {"direct", "relay", "portal"}, kind
        expected = 5 if kind == "serial" else 40
        for name, figures in report[kind].items():
            for key in FIGURES:
                assert key in figures, (kind, name, key)
            assert figures["requests"] == figures["served"] == expected, (kind, name, figures["error_examples"])
            assert figures["errors"] == 0
            assert set(figures["latency_ms"]) >= {"p50", "p90", "p99"}
            assert figures["throughput_rps"] > 0
        assert set(report[kind]["portal"]["vs_direct"]) == {
            "added_latency_p50_ms",
            "added_latency_p90_ms",
            "added_latency_p99_ms",
            "throughput_ratio",
        }
    if stream:
        assert "ttft_ms" in report["stream"]["portal"] and "ttft_ms" in report["stream"]["direct"]
        assert (tmp_path / "portal_overhead.png").stat().st_size > 0

    assert report["added_latency_p50_ms"] == report["chat"]["portal"]["vs_direct"]["added_latency_p50_ms"]
    assert report["throughput_ratio"] == report["chat"]["portal"]["vs_direct"]["throughput_ratio"]
    assert set(report["targets"]) == {
        "added_latency_p50_ms_max",
        "added_latency_met",
        "throughput_ratio_min",
        "throughput_met",
        "met",
    }
    assert report["litellm"] == {"available": False, "reason": "disabled with --litellm off"}
    assert report["machine"]["cpu_count"] >= 1 and "share" in report["machine"]["cores_shared"]
    metering = report["portal_metering"]
    assert metering["requests_metered"] == metering["requests_served"] > 0
