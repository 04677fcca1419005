"""Compare the all-to-all model with the published MoE dispatch/combine microbenchmarks.

The table (src/matrixstack/data/ep_dispatch_combine.csv) is CM-v2 Table 7: 128 tokens per rank, hidden 7168,
top-8, EP 8..256, DeepEP low-latency kernels on H800 (RDMA only, FP8 dispatch / BF16 combine) and CANN EP on
CloudMatrix384 (UB, per die, INT8 dispatch / BF16 combine). Message sizes follow the papers:
  CANN INT8 token   = 7,168 B + scale padded to 512 B = 7.5 KB  (CM-v2 §4.2.1)
  DeepEP FP8 token  = 7,168 B + one fp32 scale per 128 values    (DeepEP README)
  BF16 combine      = 7,168 x 2 B = 14 KB
The two software constants of each library (all_to_all_launch_us, per_peer_us) are fitted here by weighted
least squares on relative error over all 12 rows of that library; `fit_software_overheads` prints them so the
values in the fabric YAMLs can be reproduced.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

import numpy as np

from matrixstack.fabric.collectives import all_to_all, moe_message_bytes
from matrixstack.fabric.group import DeviceGroup
from matrixstack.fabric.loader import load_fabric
from matrixstack.fabric.spec import FabricSpec, PlaneKind

TOKENS_PER_RANK = 128
HIDDEN = 7168
TOP_K = 8
CANN_INT8_SCALE_BYTES = 512  # CM-v2 §4.2.1: scale padded to 512 B
DEEPEP_FP8_SCALE_BYTES = HIDDEN // 128 * 4  # one fp32 scale per 128-value block


@dataclass(frozen=True)
class Library:
    """A measured EP library: its fabric, the plane it rides and its per-token message sizes."""

    key: str
    fabric: str
    plane_kind: PlaneKind | None
    dispatch_bytes: float
    combine_bytes: float


LIBRARIES = (
    Library(
        "cm384",
        "cloudmatrix384",
        None,
        moe_message_bytes(TOKENS_PER_RANK, HIDDEN, TOP_K, 1, CANN_INT8_SCALE_BYTES),
        moe_message_bytes(TOKENS_PER_RANK, HIDDEN, TOP_K, 2),
    ),
    Library(
        "h800",
        "dgx-h800",
        "scale_out",  # DeepEP low-latency kernels use RDMA only, even inside a node
        moe_message_bytes(TOKENS_PER_RANK, HIDDEN, TOP_K, 1, DEEPEP_FP8_SCALE_BYTES),
        moe_message_bytes(TOKENS_PER_RANK, HIDDEN, TOP_K, 2),
    ),
)


@dataclass(frozen=True)
class Row:
    """One published measurement with its prediction."""

    library: str
    op: str
    ep: int
    published_us: float
    predicted_us: float

    @property
    def error(self) -> float:
        """Return the signed relative error (predicted / published - 1)."""
        return self.predicted_us / self.published_us - 1


def published_rows() -> list[dict[str, str]]:
    """Return the rows of the packaged dispatch/combine table."""
    text = (resources.files("matrixstack.data") / "ep_dispatch_combine.csv").read_text()
    return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


def _predict(fabric: FabricSpec, library: Library, op: str, ep: int) -> float:
    size = library.dispatch_bytes if op == "dispatch" else library.combine_bytes
    return all_to_all(DeviceGroup.first(fabric, ep), size, library.plane_kind).time_us


def compare() -> list[Row]:
    """Return every published row next to the model's prediction on the built-in fabrics."""
    rows = []
    for library in LIBRARIES:
        fabric = load_fabric(library.fabric)
        for record in published_rows():
            ep = int(record["ep"])
            published = float(record[f"{library.key}_latency_us"])
            rows.append(Row(library.key, record["op"], ep, published, _predict(fabric, library, record["op"], ep)))
    return rows


def fit_software_overheads() -> dict[str, dict[str, float]]:
    """Return, per library, the (all_to_all_launch_us, per_peer_us) minimising squared relative error."""
    fits = {}
    for library in LIBRARIES:
        fabric = load_fabric(library.fabric)
        software = fabric.collective_library
        design, target, weight = [], [], []
        for record in published_rows():
            ep = int(record["ep"])
            published = float(record[f"{library.key}_latency_us"])
            physics = _predict(fabric, library, record["op"], ep) - software.all_to_all_launch_us
            physics -= (ep - 1) * software.per_peer_us
            design.append([1.0, ep - 1.0])
            target.append(published - physics)
            weight.append(1.0 / published)
        w = np.array(weight)
        solution, *_ = np.linalg.lstsq(np.array(design) * w[:, None], np.array(target) * w, rcond=None)
        fits[library.key] = {"all_to_all_launch_us": float(solution[0]), "per_peer_us": float(solution[1])}
    return fits
