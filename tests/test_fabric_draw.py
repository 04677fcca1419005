"""Fabric pictures: every built-in fabric, `local` and a user YAML render to a readable, non-trivial PNG."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from matrixstack.fabric.loader import fabric_names, load_fabric
from matrixstack.fabric.spec import FabricSpec
from matrixstack.tools.draw.fabric import CPU_COLOR, DEVICE_COLORS, PLANE_COLORS, draw_fabric

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _colors(path: pathlib.Path) -> np.ndarray:
    """Return the distinct RGB colours (n, 3) of the PNG, after checking it is a PNG of a readable size."""
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size < 1_000_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert 1800 <= width <= 2600 and 150 <= height <= 3000
    rgb = (image[..., :3] * 255).round().astype(np.int32).reshape(-1, 3)
    packed = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    return np.stack([packed >> 16, packed >> 8 & 255, packed & 255], axis=1)


def _has_color(colors: np.ndarray, color: str) -> bool:
    """Return whether one of the colours is this one (within rounding)."""
    target = np.array([round(c * 255) for c in to_rgb(color)])
    return bool((np.abs(colors - target).max(axis=1) <= 2).any())


@pytest.mark.parametrize("name", fabric_names())
def test_every_built_in_fabric_draws(name, tmp_path):
    fabric = load_fabric(name)
    path = draw_fabric(fabric, tmp_path / f"{name}.png")
    assert path == tmp_path / f"{name}.png"
    colors = _colors(path)
    assert len(colors) > 50
    for plane in fabric.planes:
        assert _has_color(colors, PLANE_COLORS[plane.kind]), plane.name
    assert _has_color(colors, DEVICE_COLORS[0]) and _has_color(colors, CPU_COLOR)


def test_draws_a_user_yaml_fabric_with_many_nodes_and_devices(tmp_path):
    spec = load_fabric("dgx-h800").model_dump()
    spec.update(name="my-cluster", node_count=300)
    spec["device"]["devices_per_node"] = 16
    for plane in spec["planes"]:
        plane["tiers"][-1]["nodes_per_domain"] = 300
    yaml_path = tmp_path / "my-cluster.yaml"
    yaml_path.write_text(yaml.safe_dump(spec))
    path = draw_fabric(load_fabric(str(yaml_path)), str(tmp_path / "my-cluster.png"))
    assert isinstance(path, pathlib.Path)
    colors = _colors(path)
    for color in PLANE_COLORS.values():
        assert _has_color(colors, color)


def test_draws_a_one_node_fabric_of_many_cpu_cores(tmp_path):
    spec = load_fabric("local").model_dump()
    spec["device"]["devices_per_node"] = 96
    colors = _colors(draw_fabric(FabricSpec.model_validate(spec), tmp_path / "cores.png"))
    assert _has_color(colors, PLANE_COLORS["scale_up"]) and _has_color(colors, DEVICE_COLORS[0])
