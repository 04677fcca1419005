"""`matrixstack calibrate` writes measured figures that the `local` fabric then uses (mechanics, not timings).

Calibration measures for a while, so it runs once for the module (`calibrated`) and its tests share the result."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from matrixstack.arch import load_arch
from matrixstack.cli.main import app
from matrixstack.fabric.local import calibration_path, detect_local_fabric
from matrixstack.perf.step import active_experts_per_rank, kernels_per_layer
from matrixstack.tools.calibrate import FIT_BATCHES, FIT_TOLERANCE_PCT, fit_misses, predicted_decode_seconds

PLAN_ARGS = (
    "plan", "tiny-moe", "--fabric", "local", "--precision", "fp32", "--input-len", "48", "--output-len", "32",
    "--pin", "decode.devices=1", "--pin", "decode.batch_per_device=8", "--pin", "prefill.devices=1", "--json",
)  # fmt: skip


@dataclass(frozen=True)
class Calibrated:
    """One calibration in a scratch home, and what the local fabric said before it."""

    data: dict  # what `calibrate --json` printed
    description_before: str
    plan_step_ms_before: float


def invoke(*args: str):
    """Return the click Result of `matrixstack ARGS...` run in this process."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Calibrate once for the module (the bus skipped) in a scratch MATRIXSTACK_HOME, which stays set meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIXSTACK_HOME", str(tmp_path_factory.mktemp("home")))
        description = detect_local_fabric().description
        step_ms = json.loads(invoke(*PLAN_ARGS).stdout)["plan"]["decode"]["step_ms"]
        result = invoke("calibrate", "--json", "--skip-bus")
        assert result.exit_code == 0, result.output
        yield Calibrated(json.loads(result.stdout), description, step_ms)


def test_calibrate_writes_figures_the_local_fabric_uses(calibrated):
    data = calibrated.data
    assert calibration_path().is_file() and data["path"] == str(calibration_path())
    eff = data["efficiency"]
    assert 0 < eff["gemm"] <= 1 and 0 < eff["attention"] <= 1 and eff["hbm"] == 1.0
    assert eff["matmul_kernel_us"] >= 0 and eff["vector_kernel_us"] >= 0 and data["hbm_gbs"] > 0
    after = detect_local_fabric()
    assert after.device.efficiency.gemm == eff["gemm"] and after.device.hbm_gbs == data["hbm_gbs"]
    assert after.device.efficiency.matmul_kernel_us == eff["matmul_kernel_us"]
    assert "calibrated" in after.description and "calibrated" not in calibrated.description_before


def test_plan_on_local_uses_the_calibration(calibrated):
    step_ms = json.loads(invoke(*PLAN_ARGS).stdout)["plan"]["decode"]["step_ms"]
    assert step_ms != calibrated.plan_step_ms_before and step_ms > 0


def test_calibration_reproduces_the_two_decode_steps_it_was_fitted_to(calibrated):
    """The prediction meets each step it was fitted to, or calibrate reports the miss and a bound of the fit binds
    (steps measured under different load: on a busy machine the 1-sequence step can be too slow for the 32's)."""
    data = calibrated.data
    fitted, eff = data["fitted_decode_step_ms"], data["efficiency"]
    assert eff["grouped_gemm_per_expert"] is True
    for batch in FIT_BATCHES:
        miss_pct = (predicted_decode_seconds(batch) * 1e3 / fitted[str(batch)] - 1) * 100
        assert data["fit_miss_pct"][str(batch)] == pytest.approx(miss_pct, abs=0.1)  # the fit's report is true
        if abs(miss_pct) > FIT_TOLERANCE_PCT:
            assert eff["gemm"] >= 0.999 or eff["matmul_kernel_us"] == 0.0, "the fit missed with no bound binding"
            assert batch in fit_misses(data)


def test_calibrate_prints_a_summary(calibrated, monkeypatch):
    """The human-readable output, on the module's figures (no second measurement)."""
    measured = {key: value for key, value in calibrated.data.items() if key != "path"}
    monkeypatch.setattr("matrixstack.tools.calibrate.calibrate", lambda measure_bus: measured)
    result = invoke("calibrate", "--skip-bus")
    assert result.exit_code == 0, result.output
    assert f"wrote {calibration_path()}" in result.stdout and "of peak" in result.stdout
    assert "next: matrixstack plan tiny-moe --fabric local" in result.stdout


def test_calibrate_warns_when_the_fit_misses_a_step(calibrated, monkeypatch):
    """A fit that misses a step it was fitted to (a bound bound) is named with the miss and what to do."""
    measured = {key: value for key, value in calibrated.data.items() if key != "path"}
    measured["fit_miss_pct"] = {"1": 0.1, "32": 3.9}
    monkeypatch.setattr("matrixstack.tools.calibrate.calibrate", lambda measure_bus: measured)
    result = invoke("calibrate", "--skip-bus")
    assert result.exit_code == 0, result.output
    assert "misses the 32-sequence decode step by +3.9%" in result.stdout and "quiet machine" in result.stdout
    assert "1-sequence" not in result.stdout


def test_active_experts_and_their_kernels():
    arch = load_arch("tiny-moe")  # 8 experts, top-2
    assert active_experts_per_rank(arch, 0, 8) == 0
    assert active_experts_per_rank(arch, 1, 8) == pytest.approx(2)
    assert active_experts_per_rank(arch, 1, 4) == pytest.approx(1)  # half the experts on this rank
    assert 7.9 < active_experts_per_rank(arch, 32, 8) < 8
    one_launch, _ = kernels_per_layer(arch, moe_layer=True)
    per_expert, _ = kernels_per_layer(arch, moe_layer=True, active_experts=5)
    assert per_expert - one_launch == 2 * 5 - 2  # two GEMMs per active expert instead of two grouped launches
