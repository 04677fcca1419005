"""bench/portal_overhead.py's report, built from fixed measurements: figures per path and kind, the comparison with
`direct`, the targets, the metering count, the CDF picture, and the JSON written and printed.

No process starts here and no timing is asserted: the bench itself (servers, load) is run from `bench/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the bench's modules import each other

import portal_overhead
from http_load import Sample
from portal_overhead import Measured, PathRun

FIGURES = ("requests", "served", "errors", "latency_ms", "throughput_rps", "wall_s")
PATHS = ("direct", "relay", "portal")
LATENCY_MS = {"direct": 1.0, "relay": 1.5, "portal": 2.0}  # every request of a path takes this long
WALL_S = {"direct": 0.1, "relay": 0.125, "portal": 0.2}
REQUESTS = {"chat": 40, "stream": 40, "serial": 5}
WARMUP = 4


def path_run(name: str, kind: str) -> PathRun:
    """Return one path's run of `kind`: every request served in LATENCY_MS[name] (TTFT half of it when streamed)."""
    latency_s = LATENCY_MS[name] / 1000
    ttft_s = latency_s / 2 if kind == "stream" else None
    samples = [Sample(latency_s, ttft_s, ok=True) for _ in range(REQUESTS[kind])]
    cpu_s = {"upstream": 0.004, name: 0.008} if name != "direct" else {"upstream": 0.004}
    return PathRun(samples, WALL_S[name], WARMUP if kind != "serial" else 1, cpu_s)


@pytest.fixture
def measured() -> Measured:
    runs = {kind: {name: path_run(name, kind) for name in PATHS} for kind in REQUESTS}
    loads = {"chat": (40, 4), "stream": (40, 4), "serial": (5, 1)}
    litellm_reason = portal_overhead.find_litellm("off")[1]
    setup = {"db_url": "sqlite:///portal.db"}
    served = sum(REQUESTS.values()) + 2 * WARMUP + 1  # what the portal served, warm-ups included
    return Measured(runs, loads, setup, {"available": False, "reason": litellm_reason}, served)


@pytest.fixture
def report(measured) -> dict:
    args = portal_overhead.parse_args(["--requests", "40", "--concurrency", "4", "--warmup", "4", "--serial", "5"])
    return portal_overhead.build_report(portal_overhead.report_header(args), measured)


def test_every_path_of_every_kind_has_its_figures(report):
    for kind, expected in REQUESTS.items():
        assert set(report[kind]) == set(PATHS), kind
        for name, figures in report[kind].items():
            for key in FIGURES:
                assert key in figures, (kind, name, key)
            assert figures["requests"] == figures["served"] == expected and figures["errors"] == 0
            assert figures["latency_ms"]["p50"] == figures["latency_ms"]["p99"] == LATENCY_MS[name]
            assert figures["throughput_rps"] == round(expected / WALL_S[name], 1)
        assert set(report[kind]["portal"]["vs_direct"]) == {
            "added_latency_p50_ms",
            "added_latency_p90_ms",
            "added_latency_p99_ms",
            "throughput_ratio",
        }
        assert "vs_direct" not in report[kind]["direct"]
    assert report["stream"]["portal"]["ttft_ms"]["p50"] == LATENCY_MS["portal"] / 2
    assert "ttft_ms" in report["stream"]["direct"] and "ttft_ms" not in report["chat"]["direct"]
    assert report["chat"]["portal"]["cpu_ms_per_request"] == {"upstream": 0.1, "portal": 0.2}


def test_overhead_targets_and_metering(report):
    overhead = report["chat"]["portal"]["vs_direct"]
    assert overhead == {
        "added_latency_p50_ms": 1.0,
        "added_latency_p90_ms": 1.0,
        "added_latency_p99_ms": 1.0,
        "throughput_ratio": 0.5,
    }
    assert report["added_latency_p50_ms"] == overhead["added_latency_p50_ms"]
    assert report["throughput_ratio"] == overhead["throughput_ratio"]
    assert report["targets"] == {
        "added_latency_p50_ms_max": 2.0,
        "throughput_ratio_min": 0.8,
        "added_latency_met": True,
        "throughput_met": False,
        "met": False,
    }
    assert report["litellm"] == {"available": False, "reason": "disabled with --litellm off"}
    assert report["machine"]["cpu_count"] >= 1 and "share" in report["machine"]["cores_shared"]
    metering = report["portal_metering"]
    assert metering["requests_metered"] == metering["requests_served"] == sum(REQUESTS.values()) + 2 * WARMUP + 1


def test_litellm_when_it_ran_is_compared_with_direct(measured):
    for kind in REQUESTS:
        measured.runs[kind]["litellm"] = path_run("portal", kind)
    measured.litellm = {"available": True, "reason": "ran"}
    report = portal_overhead.build_report({}, measured)
    assert report["litellm"]["throughput_ratio"] == 0.5 and report["litellm"]["added_latency_p50_ms"] == 1.0
    assert measured.litellm == {"available": True, "reason": "ran"}  # the measurement is left as it was


def test_latency_cdfs_and_their_picture(measured, tmp_path):
    cdfs = portal_overhead.latency_cdfs(measured)
    assert list(cdfs) == [
        "chat: 40 requests at concurrency 4",
        "stream: 40 requests at concurrency 4",
        "serial: 5 requests at concurrency 1",
    ]
    assert cdfs["serial: 5 requests at concurrency 1"]["portal"] == [2.0] * 5
    png = tmp_path / "portal_overhead.png"
    portal_overhead.plot(cdfs, png, "fixed numbers")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 0


def test_main_writes_the_json_it_prints_last(report, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(portal_overhead, "run_bench", lambda args: report)
    out = tmp_path / "portal_overhead.json"
    assert portal_overhead.main(["--json", "--quiet", "--litellm", "off", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed == json.loads(json.dumps(report))
    assert "portal overhead: 40 requests at concurrency 4" in captured.err
    assert "litellm: skipped (disabled with --litellm off)" in captured.err
