"""Fabric specs: the built-in catalog's figures, YAML paths, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

from matrixstack.errors import SpecError, UnknownNameError
from matrixstack.fabric.loader import fabric_names, load_fabric

BUILT_IN = ["ascend910c-8x-roce", "cloudmatrix384", "dgx-h100", "dgx-h800", "gb200-nvl72", "h200-node", "local"]


def test_catalog_lists_every_required_fabric():
    assert fabric_names() == BUILT_IN


def test_cloudmatrix384_matches_the_paper():
    cm = load_fabric("cloudmatrix384")
    assert (cm.node_count, cm.device.devices_per_node, cm.device_count, cm.die_count) == (48, 8, 384, 768)
    assert cm.cpu_count == 192
    assert cm.scale_up_domain_size == 384
    assert cm.device.hbm_gib / cm.device.dies_per_device == 64
    assert cm.device.hbm_gbs / cm.device.dies_per_device == 1600
    assert cm.device.peak_tflops["int8"] == 1504 and cm.device.peak_tflops["fp16"] == 752
    ub, rdma, vpc = cm.plane("scale_up"), cm.plane("scale_out"), cm.plane("frontend")
    assert ub.bandwidth_gbs == 392 and ub.attached == "device"
    assert [t.switches_per_domain for t in ub.tiers] == [7, 7 * 16]
    assert [t.nodes_per_domain for t in ub.tiers] == [1, 48]
    assert all(t.oversubscription == 1.0 for t in ub.tiers)
    assert rdma.bandwidth_gbs * 8 == 400  # 400 Gbps per NPU
    assert vpc.attached == "node" and vpc.bandwidth_gbs * 8 == 400
    # Table 1: cross-node latency 1.9 us vs 1.2 us in node
    assert sum(t.latency_us for t in ub.tiers) == pytest.approx(1.9)


def test_baseline_is_the_same_npu_without_the_supernode_bus():
    cm, roce = load_fabric("cloudmatrix384"), load_fabric("ascend910c-8x-roce")
    assert cm.device == roce.device
    assert roce.device_count == cm.device_count
    assert roce.scale_up_domain_size == 8
    # a conventional server's RoCE: 200 Gbps per NPU (CM-v2 §4.1), half the supernode's RDMA plane
    assert roce.plane("scale_out").bandwidth_gbs * 8 == 200
    assert roce.plane("scale_out").bandwidth_gbs < cm.plane("scale_out").bandwidth_gbs


@pytest.mark.parametrize(
    ("name", "per_node", "domain", "scale_out_gbs"),
    [("dgx-h800", 8, 8, 50), ("dgx-h100", 8, 8, 50), ("gb200-nvl72", 4, 72, 50), ("h200-node", 8, 8, 50)],
)
def test_nvidia_fabrics(name, per_node, domain, scale_out_gbs):
    fabric = load_fabric(name)
    assert fabric.device.devices_per_node == per_node
    assert fabric.scale_up_domain_size == domain
    assert fabric.plane("scale_out").bandwidth_gbs == scale_out_gbs


def test_efficiency_factors_come_from_the_paper_for_ascend():
    eff = load_fabric("cloudmatrix384").device.efficiency
    assert (eff.attention, eff.hbm) == (0.654, 0.841)  # CM-v2 Tables 8 and 9
    assert 0.774 <= eff.gemm <= 0.827  # CM-v2 Table 10 range
    assert eff.matmul_kernel_us > eff.vector_kernel_us > 0


def test_local_fabric_is_this_machine():
    local = load_fabric("local")
    assert local.node_count == 1
    assert local.device_count >= 1
    if not Path("/dev/nvidia0").exists():
        assert local.device_count == os.cpu_count()
        assert local.device.peak_tflops["fp32"] > 0


def test_every_figure_in_the_catalog_has_a_source_comment():
    folder = resources.files("matrixstack.fabric.catalog")
    for entry in folder.iterdir():
        if not entry.name.endswith(".yaml"):
            continue
        for number, line in enumerate(entry.read_text().splitlines(), 1):
            if re.match(r"^\s*[a-z_0-9]+:\s*[0-9.]+\s*(#|$)", line):
                assert "#" in line, f"{entry.name}:{number} has a figure without a source comment: {line.strip()}"


def test_summary_has_the_keys_the_cli_promises():
    summary = load_fabric("cloudmatrix384").summary()
    for key in ("name", "node_count", "devices_per_node", "device_count", "die_count", "cpu_count"):
        assert key in summary
    assert summary["scale_up_domain_size"] == 384 and summary["hbm_gib_total"] == 384 * 128


def _builtin_yaml(name: str) -> dict:
    return yaml.safe_load((resources.files("matrixstack.fabric.catalog") / f"{name}.yaml").read_text())


def test_a_yaml_path_works_like_a_name(tmp_path):
    data = _builtin_yaml("dgx-h800")
    data["name"] = "my-cluster"
    data["node_count"] = 4
    path = tmp_path / "my-cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    fabric = load_fabric(str(path))
    assert fabric.name == "my-cluster" and fabric.device_count == 32


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="cloudmatrix384.*local"):
        load_fabric("cloudmatrix999")


def test_wrong_type_names_file_field_and_unit(tmp_path):
    data = _builtin_yaml("cloudmatrix384")
    data["planes"][0]["bandwidth_gbs"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_fabric(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "planes[0].bandwidth_gbs" in message
    assert "GB/s" in message and "'fast'" in message


def test_missing_field_and_typo_are_reported(tmp_path):
    data = _builtin_yaml("cloudmatrix384")
    del data["device"]["hbm_gib"]
    data["host"]["dram_gb"] = data["host"].pop("dram_gib")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_fabric(str(path))
    message = str(info.value)
    assert "device.hbm_gib" in message and "GiB" in message
    assert "host.dram_gb" in message and "host.dram_gib" in message


def test_tiers_must_grow(tmp_path):
    data = _builtin_yaml("cloudmatrix384")
    data["planes"][0]["tiers"].reverse()
    path = tmp_path / "tiers.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="strictly more nodes"):
        load_fabric(str(path))


def test_malformed_yaml_gives_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nnode_count: [1, 2\ndevice: {}\n")
    with pytest.raises(SpecError, match=r"broken.yaml: malformed YAML at line \d+"):
        load_fabric(str(path))


def test_cli_show_json_keys(cli):
    result = cli("fabric", "show", "cloudmatrix384", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["device_count"] == 384 and data["die_count"] == 768 and data["cpu_count"] == 192
    assert data["scale_up_domain_size"] == 384 and data["hbm_gib_total"] == 49152


def test_cli_list_has_every_fabric(cli):
    result = cli("fabric", "list", "--json")
    assert [f["name"] for f in json.loads(result.stdout)] == BUILT_IN
    table = cli("fabric", "list")
    assert table.exit_code == 0 and "cloudmatrix384" in table.stdout


def test_cli_show_table_is_readable(cli):
    result = cli("fabric", "show", "cloudmatrix384")
    assert result.exit_code == 0
    assert "392 GB/s per device" in result.stdout and "L2" in result.stdout


@pytest.mark.parametrize("args", [("fabric", "show", "nope"), ("fabric", "show", "/nonexistent/fabric.yaml")])
def test_cli_bad_name_or_path_exits_2(cli, args):
    result = cli(*args)
    assert result.exit_code == 2
    assert "error:" in result.stderr and "Traceback" not in result.output


def test_cli_malformed_file_exits_2_naming_file_and_field(cli, tmp_path):
    data = _builtin_yaml("dgx-h800")
    data["device"]["devices_per_node"] = "eight"
    path = tmp_path / "bad-dgx.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli("fabric", "show", str(path))
    assert result.exit_code == 2
    assert "bad-dgx.yaml" in result.stderr and "device.devices_per_node" in result.stderr
    assert "integer" in result.stderr
