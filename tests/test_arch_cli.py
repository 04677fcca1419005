"""`matrixstack arch list|show|import` through the real CLI app (the `cli` fixture of conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from matrixstack.arch import arch_names, load_arch

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"
CATALOG = Path(__file__).parents[1] / "src" / "matrixstack" / "arch" / "catalog"
REQUIRED_KEYS = {
    "name",
    "total_params",
    "active_params",
    "layers",
    "routed_experts",
    "experts_per_token",
    "kv_bytes_per_token",
}


def test_list_table_names_every_built_in(cli):
    result = cli("arch", "list")
    assert result.exit_code == 0, result.output
    for name in arch_names():
        assert name in result.output
    assert "671B" in result.output  # DeepSeek-V3 total


def test_list_json_has_the_required_keys(cli):
    result = cli("arch", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == arch_names()
    for row in rows:
        assert REQUIRED_KEYS <= set(row)
        arch = load_arch(row["name"])
        assert row["total_params"] == arch.total_params()
        assert row["kv_bytes_per_token"] == arch.kv_bytes_per_token("bf16")


def test_show_json_for_deepseek_v3(cli):
    result = cli("arch", "show", "deepseek-v3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert REQUIRED_KEYS <= set(data)
    assert (data["layers"], data["routed_experts"], data["experts_per_token"]) == (61, 256, 8)
    assert data["kv_bytes_per_token"] == 61 * 576 * 2
    assert abs(data["total_params"] - 671e9) / 671e9 < 0.01
    assert data["spec"]["attention"]["kind"] == "mla"
    assert data["component_params"]["one routed expert"] == 3 * 7168 * 2048


def test_show_options_change_the_figures(cli):
    base = json.loads(cli("arch", "show", "llama-3.1-8b", "--json").stdout)
    fp8 = json.loads(cli("arch", "show", "llama-3.1-8b", "--json", "--kv-dtype", "fp8").stdout)
    long = json.loads(cli("arch", "show", "llama-3.1-8b", "--json", "--context", "32768").stdout)
    assert fp8["kv_bytes_per_token"] * 2 == base["kv_bytes_per_token"]
    assert long["flops_per_token"]["decode"] > base["flops_per_token"]["decode"]
    assert base["routed_experts"] == base["experts_per_token"] == 0


def test_show_table(cli):
    result = cli("arch", "show", "qwen3-235b-a22b")
    assert result.exit_code == 0, result.output
    assert "qwen3-235b-a22b" in result.output and "GQA" in result.output


def test_show_accepts_a_yaml_path(cli, tmp_path):
    path = tmp_path / "mine.yaml"
    shutil.copy(CATALOG / "tiny-moe.yaml", path)
    by_path = json.loads(cli("arch", "show", str(path), "--json").stdout)
    by_name = json.loads(cli("arch", "show", "tiny-moe", "--json").stdout)
    assert by_path == by_name


def test_unknown_name_exits_2_listing_the_names(cli):
    result = cli("arch", "show", "gpt-5")
    assert result.exit_code == 2
    assert "unknown arch 'gpt-5'" in result.output and "deepseek-v3" in result.output
    assert "Traceback" not in result.output


def test_malformed_file_exits_2_naming_file_field_and_unit(cli, tmp_path):
    data = yaml.safe_load((CATALOG / "mixtral-8x7b.yaml").read_text())
    data["ffn"]["moe"]["routed_experts"] = "eight"
    path = tmp_path / "bad-mixtral.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli("arch", "show", str(path))
    assert result.exit_code == 2
    assert str(path) in result.output
    assert "ffn.moe.routed_experts" in result.output
    assert "integer count of routed experts" in result.output
    assert "Traceback" not in result.output


def test_broken_yaml_exits_2_with_the_line(cli, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\n  layers: [\n")
    result = cli("arch", "show", str(path))
    assert result.exit_code == 2
    assert f"arch file {path}: malformed YAML at line 2" in result.output


def test_bad_dtype_exits_2(cli):
    result = cli("arch", "list", "--kv-dtype", "fp6")
    assert result.exit_code == 2
    assert "unknown dtype 'fp6'" in result.output


def test_import_to_stdout_is_loadable_yaml(cli):
    result = cli("arch", "import", str(HF_CONFIGS / "qwen3-235b-a22b.json"), "--name", "q")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["name"] == "q"
    assert data["ffn"]["moe"]["routed_experts"] == 128
    assert '# config.json "num_experts"' in result.stdout


def test_import_out_file_round_trips_through_show(cli, tmp_path):
    out = tmp_path / "ds.yaml"
    result = cli("arch", "import", str(HF_CONFIGS / "deepseek-v3.json"), "--name", "ds", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    shown = json.loads(cli("arch", "show", str(out), "--json").stdout)
    built_in = json.loads(cli("arch", "show", "deepseek-v3", "--json").stdout)
    assert shown["name"] == "ds"
    for key in REQUIRED_KEYS - {"name"}:
        assert shown[key] == built_in[key], key


def test_import_unsupported_model_type_exits_2(cli, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    result = cli("arch", "import", str(path))
    assert result.exit_code == 2
    assert "model_type 'gpt2' is not supported" in result.output
    assert "qwen3_moe" in result.output
    assert "Traceback" not in result.output


def test_import_missing_file_exits_2(cli, tmp_path):
    result = cli("arch", "import", str(tmp_path / "nope.json"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_import_to_an_unwritable_out_exits_2_naming_it(cli, tmp_path):
    out = tmp_path / "no-such-folder" / "ds.yaml"
    result = cli("arch", "import", str(HF_CONFIGS / "deepseek-v3.json"), "--out", str(out))
    assert result.exit_code == 2
    assert f"--out {out}: cannot write it" in result.output and "pick a writable path" in result.output
    assert "Traceback" not in result.output
