"""bench/engine_vs_vllm.py: the report built from fixed samples (figures, percentiles, the headline's dtype choice
and ratio), its options' errors, and the script itself run for real on a tiny workload so it cannot rot: the
builtin engine alone (a few seconds), and with vLLM (slow: vLLM takes minutes to start on these machines).

No throughput is asserted: it depends on the machine. The bench itself is run from `bench/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the bench's modules import each other

import engine_vs_vllm
from engine_vs_vllm import Run, figures, parse_args, percentile, report
from http_load import Sample

from matrixstack.tools.bench import BenchRequest

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = [BenchRequest([8] * 10, 5), BenchRequest([9] * 20, 3)]
PER_REQUEST = ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")
TINY = ["--requests", "2", "--concurrency", "2", "--repeats", "1", "--json"]


def run_of(wall_s: float) -> Run:
    """Return a run of REQUESTS in `wall_s`: request 0 takes 0.5 s (first token at 0.1 s), request 1 0.3 s (0.1)."""
    return Run([Sample(0.5, 0.1, True, None, 5), Sample(0.3, 0.1, True, None, 3)], wall_s)


def test_percentiles_interpolate_between_ranks():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.5) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.99) == pytest.approx(4.96)
    assert percentile([7.0], 0.99) == 7.0


def test_figures_take_the_fastest_run_and_its_latencies():
    result = figures([run_of(2.0), run_of(1.0)], REQUESTS)
    assert result["output_tokens_per_s"] == 8.0  # 5 + 3 tokens in the faster run's 1.0 s
    assert result["runs_output_tokens_per_s"] == [4.0, 8.0]
    assert result["ttft_ms_p50"] == 100.0
    assert result["tpot_ms_p50"] == pytest.approx((400 / 4 + 200 / 2) / 2)  # (latency - ttft) / (tokens - 1)
    assert result["tpot_ms_p99"] == pytest.approx(100.0)


def test_a_run_with_a_wrong_token_count_or_a_failure_is_refused():
    engine_vs_vllm.check_run(run_of(1.0), REQUESTS, "builtin")
    short = Run([Sample(0.5, 0.1, True, None, 4), Sample(0.3, 0.1, True, None, 3)], 1.0)
    with pytest.raises(RuntimeError, match="request 0 produced 4 tokens, not 5"):
        engine_vs_vllm.check_run(short, REQUESTS, "vllm")
    failed = Run([Sample(0.5, None, False, "HTTP 500: boom"), Sample(0.3, 0.1, True, None, 3)], 1.0)
    with pytest.raises(RuntimeError, match="vllm: request 0 failed: HTTP 500"):
        engine_vs_vllm.check_run(failed, REQUESTS, "vllm")


def test_report_headline_is_workload_a_with_each_server_in_its_faster_dtype():
    args = parse_args(["--workloads", "A,B"])
    rates = {("builtin", "float32"): 1000, ("builtin", "bfloat16"): 800, ("vllm", "float32"): 700}
    rates[("vllm", "bfloat16")] = 1250
    results = {
        key: {"A": {"output_tokens_per_s": rate}, "B": {"output_tokens_per_s": rate / 4}, "ready_s": 1.0}
        for key, rate in rates.items()
    }
    out = report(results, args)
    assert (out["engine_tokens_per_s"], out["engine_dtype"]) == (1000, "float32")
    assert (out["vllm_tokens_per_s"], out["vllm_dtype"]) == (1250, "bfloat16")
    assert out["ratio"] == 0.8 and out["workload"] == "A"
    assert out["workloads"]["B"]["float32"]["ratio"] == round(250 / 175, 2)
    assert out["workloads"]["A"]["bfloat16"]["ratio"] == 0.64
    settings = out["settings"]
    assert settings["dtypes"] == ["float32", "bfloat16"] and settings["requests"] == 64
    assert settings["concurrency"] == 32 and settings["cores"] >= 1 and settings["torch"]
    assert "--dtype" in settings["vllm_flags"] and settings["workloads"]["B"]["prompt_tokens"]["min"] == 512
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engines", "sglang"], "--engines: sglang; choose from builtin, vllm"),
        (["--workloads", "C"], "--workloads: C"),
        (["--dtypes", "float16"], "--dtypes: float16"),
        (["--requests", "0"], "--requests must be at least 1"),
    ],
)
def test_bad_options_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def run_bench(args: list[str], out: Path, timeout_s: float) -> dict:
    """Run the bench script in a subprocess; return its JSON line (and check the file it wrote is the same)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "bench" / "engine_vs_vllm.py"), *args, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    return result


def check_server_figures(per: dict) -> None:
    """Assert one server's figures of one workload are there and positive."""
    assert per["output_tokens_per_s"] > 0 and len(per["runs_output_tokens_per_s"]) == 1
    for key in PER_REQUEST:
        assert per[key] > 0, key


@pytest.mark.slow
def test_bench_runs_the_builtin_engine_over_http_on_both_workloads(tmp_path):
    """The engine half for real: its server process, two requests of each workload, the JSON."""
    args = ["--engines", "builtin", "--dtypes", "float32", *TINY]
    result = run_bench(args, tmp_path / "out.json", timeout_s=300)
    assert result["engine_tokens_per_s"] > 0 and result["engine_dtype"] == "float32"
    assert result["vllm_tokens_per_s"] is None and result["ratio"] is None
    for label in ("A", "B"):
        check_server_figures(result["workloads"][label]["float32"]["builtin"])
        assert "ratio" not in result["workloads"][label]["float32"]
    assert result["settings"]["vllm"] is None and result["ready_s"]["builtin float32"] > 0


@pytest.mark.slow
@pytest.mark.usefixtures("installed_vllm_venv")
def test_bench_compares_the_engine_with_a_real_vllm(tmp_path):
    """Both servers for real on workload A in float32 (vLLM starts in 1-3 minutes here)."""
    args = ["--workloads", "A", "--dtypes", "float32", *TINY]
    result = run_bench(args, tmp_path / "out.json", timeout_s=900)
    per = result["workloads"]["A"]["float32"]
    check_server_figures(per["builtin"])
    check_server_figures(per["vllm"])
    assert result["ratio"] == round(result["engine_tokens_per_s"] / result["vllm_tokens_per_s"], 2)
    assert result["settings"]["vllm"].startswith("vllm")
