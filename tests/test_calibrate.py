"""`matrixstack calibrate` writes measured figures that the `local` fabric then uses (mechanics, not timings)."""

from __future__ import annotations

import json

import pytest

from matrixstack.fabric.local import calibration_path, detect_local_fabric


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
