"""Fleet simulation: the job mix, traces, determinism, matrix vs server supply and the pod-size sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.simulate import pod_size_sweep, resize_pod, run_policy, simulate
from matrixstack.matrix.trace import JobMix, generate, read_trace, size_exponent, write_trace

CM384 = load_fabric("cloudmatrix384")


def test_default_mix_has_the_documented_shape():
    jobs = generate(JobMix(), 20_000, 4 * 384, 384, seed=5)
    sizes = np.array([j.devices for j in jobs])
    assert sizes.min() == 1 and sizes.max() <= 384
    assert sizes.mean() == pytest.approx(10.08, rel=0.1)
    assert 0.43 < (sizes == 1).mean() < 0.5  # "46% of jobs take 1 device"
    assert 0.80 < (sizes <= 8).mean() < 0.86  # "83% at most 8"
    durations = np.array([j.duration_s for j in jobs])
    assert durations.mean() == pytest.approx(3600, rel=0.1)
    arrivals = np.array([j.arrival_s for j in jobs])
    offered = (sizes * durations).sum() / (arrivals[-1] * 4 * 384)  # device-seconds asked per fleet second
    assert offered == pytest.approx(1.0, rel=0.1)
    assert generate(JobMix(), 20_000, 4 * 384, 384, seed=5) == jobs  # seeded
    with pytest.raises(UserError, match="outside 1.."):
        size_exponent(300, 384)


def test_simulation_is_deterministic_by_seed():
    jobs = generate(JobMix(), 800, 384, 384, seed=2)
    first = run_policy(CM384, 1, jobs, "matrix").to_dict()
    assert run_policy(CM384, 1, jobs, "matrix").to_dict() == first
    other = run_policy(CM384, 1, generate(JobMix(), 800, 384, 384, seed=3), "matrix").to_dict()
    assert other != first


def test_matrix_supply_beats_server_supply_on_cloudmatrix384():
    jobs = generate(JobMix(), 3000, 2 * 384, 384, seed=1)
    results = {r.policy: r for r in simulate(CM384, 2, ["matrix", "server", "tiered"], jobs)}
    matrix, server, tiered = results["matrix"], results["server"], results["tiered"]
    assert matrix.utilisation > server.utilisation + 0.2
    assert matrix.stranded == pytest.approx(0, abs=1e-9) and server.stranded > 0.3  # whole servers for small jobs
    assert server.allocation > server.utilisation
    assert matrix.mean_wait_s < server.mean_wait_s
    assert matrix.fragmentation < tiered.fragmentation  # tight fits keep whole nodes whole
    assert 0 <= matrix.rejection_rate <= server.rejection_rate


def test_pod_size_sweep_reproduces_the_papers_direction():
    """CM-v2 §6.1.2: over 94% of NPUs allocated on 384-NPU pods, under 91% on 224-NPU pods."""
    points = pod_size_sweep(CM384, 2, [28, 48], 3000, seed=1)
    assert [p.pod_devices for p in points] == [224, 384]
    small, large = (p.result.utilisation for p in points)
    assert large > small + 0.01


def test_resize_pod_caps_the_tiers():
    pod = resize_pod(CM384, 28)
    assert pod.name == "cloudmatrix384-224" and pod.device_count == 224 and pod.scale_up_domain_size == 224
    with pytest.raises(UserError, match="at least one node"):
        resize_pod(CM384, 0)


def test_trace_round_trip(tmp_path):
    jobs = generate(JobMix(), 100, 384, 384, seed=4)
    path = tmp_path / "trace.csv"
    write_trace(jobs, path)
    back = read_trace(path)
    assert [(j.id, j.devices) for j in back] == [(j.id, j.devices) for j in jobs]
    assert all(abs(a.arrival_s - b.arrival_s) < 1e-3 and abs(a.duration_s - b.duration_s) < 1e-3
               for a, b in zip(back, jobs, strict=True))  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("job,arrival_s,devices,duration_s\n0,0,4,10\n1,5,four,10\n", "line 3: devices 'four' is not a number"),
        ("job,arrival_s,devices,duration_s\n# comment\n0,0,2.5,10\n", "line 3: devices must be an integer"),
        ("job,arrival_s,devices,duration_s\n0,0,4\n", "line 2: expected 4 fields, got 3"),
        ("job,arrival_s,devices,duration_s\n0,0,4,-1\n", "line 2: duration_s must be"),
        ("id,when,size\n", "line 1: expected the header job,arrival_s,devices,duration_s"),
        ("job,arrival_s,devices,duration_s\n", "has no jobs"),
    ],
)
def test_malformed_trace_exits_2_with_the_line(cli, tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    result = cli("matrix", "simulate", "--trace", str(path), "--count", "1")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_simulate_cli_json_png_and_trace(cli, tmp_path):
    png, trace = tmp_path / "sim.png", tmp_path / "jobs.csv"
    result = cli("matrix", "simulate", "--fabric", "cloudmatrix384", "--count", "1", "--policy", "matrix,server",
                 "--jobs", "600", "--seed", "3", "--pod-nodes", "28,48", "--write-trace", str(trace),
                 "--png", str(png), "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [r["policy"] for r in out["results"]] == ["matrix", "server"]
    keys = {"utilisation", "allocation", "rejection_rate", "mean_wait_s", "fragmentation", "stranded"}
    assert keys <= set(out["results"][0])
    assert [p["pod_devices"] for p in out["pod_size_sweep"]] == [224, 384]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replay = cli("matrix", "simulate", "--count", "1", "--policy", "matrix", "--seed", "3", "--trace", str(trace),
                 "--json")  # fmt: skip
    assert json.loads(replay.output)["results"][0]["jobs"] == 600
    assert json.loads(replay.output)["results"][0]["utilisation"] == pytest.approx(
        out["results"][0]["utilisation"], abs=0.01
    )
    bad = cli("matrix", "simulate", "--policy", "matrix,best", "--jobs", "10")
    assert bad.exit_code == 2 and "unknown policy best" in bad.output
