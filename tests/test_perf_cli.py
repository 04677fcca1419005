"""perf CLI: plan, compare and validate, their JSON, PNGs and errors."""

from __future__ import annotations

import json

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_json_has_the_promised_keys(cli, tmp_path):
    png = tmp_path / "front.png"
    result = cli(
        "plan", "deepseek-v3", "--fabric", "cloudmatrix384", "--devices", "64", "--precision", "int8",
        "--input-len", "2048", "--output-len", "512", "--tpot-ms", "60", "--ttft-ms", "3000",
        "--mtp-acceptance", "0.7", "--json", "--png", str(png),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("prefill_tokens_per_s_per_device", "decode_tokens_per_s_per_device", "tpot_ms", "ttft_ms"):
        assert data[key] > 0
    assert data["tpot_ms"] <= 60 and data["ttft_ms"] <= 3000
    assert data["decode_batch_per_device"] >= 1 and data["devices"] <= 64
    for phase in ("prefill", "decode"):
        for key in ("devices", "tp", "dp", "ep", "batch"):
            assert key in data["plan"][phase]
    assert png.read_bytes()[:8] == PNG


def test_plan_pins(cli):
    result = cli(
        "plan", "deepseek-r1", "--fabric", "cloudmatrix384", "--pin", "decode.devices=160", "--pin", "decode.ep=320",
        "--pin", "decode.batch_per_device=96", "--pin", "prefill.devices=16", "--pin", "prefill.ep=32",
        "--pin", "prefill.tokens_per_device=16384", "--tpot-ms", "1000", "--ttft-ms", "10000", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert (plan["decode"]["devices"], plan["decode"]["ep"], plan["decode"]["batch"]) == (160, 320, 96)
    assert (plan["prefill"]["devices"], plan["prefill"]["ep"], plan["prefill"]["batch"]) == (16, 32, 16384)
    assert plan["decode"]["largest_batch_that_fits"] >= 96
    bad = cli("plan", "deepseek-r1", "--fabric", "cloudmatrix384", "--pin", "decode.tokens_per_device=8")
    assert bad.exit_code == 2 and "PHASE.FIELD=VALUE" in bad.stderr


def test_plan_table(cli):
    result = cli("plan", "deepseek-r1", "--fabric", "dgx-h800", "--precision", "fp8", "--devices", "64")
    assert result.exit_code == 0
    assert "moe_dispatch" in result.stdout and "kv_cache" in result.stdout


@pytest.mark.slow
def test_compare_json_holds_both_and_the_ratio(cli, tmp_path):
    png = tmp_path / "compare.png"
    result = cli(
        "compare", "deepseek-r1", "--fabrics", "cloudmatrix384,ascend910c-8x-roce", "--precision", "int8",
        "--tpot-ms", "50", "--json", "--png", str(png),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    cm, roce = data["results"]["cloudmatrix384"], data["results"]["ascend910c-8x-roce"]
    expected = cm["decode_tokens_per_s_per_device"] / roce["decode_tokens_per_s_per_device"]
    assert abs(data["ratio"] - expected) < 0.01
    assert png.read_bytes()[:8] == PNG


def test_validate_json(cli):
    result = cli("validate", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["median_abs_error"] <= 0.15
    ids = {row["id"] for row in data["rows"]}
    assert {"cm384-decode-50ms", "h800-prefill-profile", "rtp-h800-decode"} <= ids
    for row in data["rows"]:
        assert set(row) >= {"id", "published", "predicted", "error"}
        assert abs(row["predicted"] / row["published"] - 1 - row["error"]) < 1e-3


def test_user_errors_exit_2(cli):
    cases = [
        (("plan", "deepseek-r1", "--fabric", "cloudmatrix384", "--precision", "fp8"), "no native FP8"),
        (("plan", "nope", "--fabric", "cloudmatrix384"), "unknown arch"),
        (("plan", "deepseek-r1", "--fabric", "cloudmatrix384", "--pin", "decode.devices=abc"), "not a number"),
        (("plan", "deepseek-r1", "--fabric", "h200-node", "--precision", "bf16"), "does not fit"),
        (("plan", "deepseek-r1", "--fabric", "cloudmatrix384", "--devices", "999"), "exceeds"),
        (("compare", "deepseek-r1", "--fabrics", "cloudmatrix384"), "two fabrics"),
        (("plan", "deepseek-r1", "--fabric", "cloudmatrix384", "--mtp-acceptance", "2"), "probability"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
