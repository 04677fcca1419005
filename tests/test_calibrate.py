"""`matrixstack calibrate` writes measured figures that the `local` fabric then uses (mechanics, not timings)."""

from __future__ import annotations

import json

import pytest

from matrixstack.arch import load_arch
from matrixstack.fabric.local import calibration_path, detect_local_fabric
from matrixstack.perf.step import active_experts_per_rank, kernels_per_layer
from matrixstack.tools.calibrate import FIT_BATCHES, predicted_decode_seconds


@pytest.fixture
def scratch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path))
    return tmp_path


def test_calibrate_writes_figures_the_local_fabric_uses(cli, scratch_home):
    before = detect_local_fabric()
    result = cli("calibrate", "--json", "--skip-bus")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert calibration_path().is_file() and data["path"] == str(calibration_path())
    eff = data["efficiency"]
    assert 0 < eff["gemm"] <= 1 and 0 < eff["attention"] <= 1 and eff["hbm"] == 1.0
    assert eff["matmul_kernel_us"] >= 0 and eff["vector_kernel_us"] >= 0 and data["hbm_gbs"] > 0
    after = detect_local_fabric()
    assert after.device.efficiency.gemm == eff["gemm"] and after.device.hbm_gbs == data["hbm_gbs"]
    assert after.device.efficiency.matmul_kernel_us == eff["matmul_kernel_us"]
    assert "calibrated" in after.description and "calibrated" not in before.description


def test_plan_on_local_uses_the_calibration(cli, scratch_home):
    args = (
        "plan", "tiny-moe", "--fabric", "local", "--precision", "fp32", "--input-len", "48", "--output-len", "32",
        "--pin", "decode.devices=1", "--pin", "decode.batch_per_device=8", "--pin", "prefill.devices=1", "--json",
    )  # fmt: skip
    estimated = json.loads(cli(*args).stdout)["plan"]["decode"]["step_ms"]
    assert cli("calibrate", "--skip-bus").exit_code == 0
    calibrated = json.loads(cli(*args).stdout)["plan"]["decode"]["step_ms"]
    assert calibrated != estimated and calibrated > 0


def test_calibration_reproduces_the_two_decode_steps_it_was_fitted_to(cli, scratch_home):
    data = json.loads(cli("calibrate", "--json", "--skip-bus").stdout)
    fitted = data["fitted_decode_step_ms"]
    assert data["efficiency"]["grouped_gemm_per_expert"] is True
    for batch in FIT_BATCHES:  # the fit's own consistency: the prediction meets the step it was fitted to
        assert predicted_decode_seconds(batch) * 1e3 == pytest.approx(fitted[str(batch)], rel=0.02)


def test_active_experts_and_their_kernels():
    arch = load_arch("tiny-moe")  # 8 experts, top-2
    assert active_experts_per_rank(arch, 0, 8) == 0
    assert active_experts_per_rank(arch, 1, 8) == pytest.approx(2)
    assert active_experts_per_rank(arch, 1, 4) == pytest.approx(1)  # half the experts on this rank
    assert 7.9 < active_experts_per_rank(arch, 32, 8) < 8
    one_launch, _ = kernels_per_layer(arch, moe_layer=True)
    per_expert, _ = kernels_per_layer(arch, moe_layer=True, active_experts=5)
    assert per_expert - one_launch == 2 * 5 - 2  # two GEMMs per active expert instead of two grouped launches
