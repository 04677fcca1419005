"""Run every published serving result with its layout pinned and compare with the prediction.

The rows are `src/matrixstack/data/published_results.csv`, copied from shared/data/published_results.csv
(context and caveats per row in shared/data/published_results.md). A row's layout (devices, EP, batch,
lengths, MTP) is pinned; what a row leaves blank is searched under the row's own SLO (TPOT) or the default
TTFT. The error is signed: predicted / published - 1. The target set is the `measured` and `profiled` rows.

Expert-load imbalance per row follows its kind: `profiled` and `projected-perfect-eplb` rows ran with balanced
routing (skew 0); measured and production rows run with real routing (`DEFAULT_EXPERT_SKEW`).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from importlib import resources

from matrixstack.arch.loader import load_arch
from matrixstack.fabric.loader import load_fabric
from matrixstack.perf.search import DEFAULT_EXPERT_SKEW, DEFAULT_SEQUENCE_EXPERT_CV, best_instance
from matrixstack.perf.spec import Slo, Workload

TARGET_KINDS = ("measured", "profiled")
BALANCED_KINDS = ("profiled", "projected-perfect-eplb")
# Latency targets the CSV has no column for, from the row's source (published_results.md).
ROW_TTFT_MS = {"rtp-h800-prefill": 1600.0}  # P5: "4K in / 2K out, TTFT <= 1.6 s"
# Published pairs of a measured run and its perfect-EPLB projection (same layout): their ratio is the cost of
# real routing, which `fit_sequence_expert_cv` matches.
EPLB_PAIRS = (
    ("cm384-prefill-default", "cm384-prefill-perfect-eplb"),
    ("h100-sglang-prefill", "h100-sglang-prefill-perfect-eplb"),
)


@dataclass(frozen=True)
class ValidationRow:
    """One published result and its prediction."""

    id: str
    kind: str
    phase: str
    fabric: str
    published: float
    predicted: float
    tpot_ms: float | None

    @property
    def error(self) -> float:
        """Return the signed relative error, predicted / published - 1."""
        return self.predicted / self.published - 1

    @property
    def in_target(self) -> bool:
        """Return True for rows the accuracy target covers (measured and profiled)."""
        return self.kind in TARGET_KINDS


def published_rows() -> list[dict[str, str]]:
    """Return the packaged published-results rows as dicts of strings."""
    text = (resources.files("matrixstack.data") / "published_results.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


def _number(row: dict[str, str], key: str) -> float | None:
    value = row.get(key, "").strip()
    return float(value) if value else None


def predict_row(row: dict[str, str], sequence_expert_cv: float = DEFAULT_SEQUENCE_EXPERT_CV) -> ValidationRow:
    """Return the prediction for one published row, its layout pinned."""
    arch, fabric = load_arch(row["arch"]), load_fabric(row["fabric"])
    phase = row["phase"]
    input_len = int(_number(row, "input_len") or 4096)
    workload = Workload(
        input_len=input_len,
        output_len=int(_number(row, "output_len") or 256),
        kv_len=int(_number(row, "kv_len") or 0) or None,
        precision=row["precision"],
        mtp_acceptance=_number(row, "mtp_acceptance") or 0.0,
        expert_skew=0.0 if row["kind"] in BALANCED_KINDS else DEFAULT_EXPERT_SKEW,
        sequence_expert_cv=0.0 if row["kind"] in BALANCED_KINDS else sequence_expert_cv,
    )
    tpot = _number(row, "tpot_ms")
    slo = Slo(tpot_ms=tpot or 1e9, ttft_ms=ROW_TTFT_MS.get(row["id"], Slo().ttft_ms))
    pinned = {key: _number(row, key) for key in ("devices", "ep", "batch_per_device")}
    pins = {key: value for key, value in pinned.items() if value is not None}
    result = best_instance(arch, fabric, workload, slo, phase, pins)
    predicted = result.tokens_per_s_per_device
    return ValidationRow(
        row["id"], row["kind"], phase, row["fabric"], float(row["tokens_per_s_per_device"]), predicted, result.tpot_ms
    )


def validate() -> tuple[list[ValidationRow], float]:
    """Return every row's prediction and the median absolute error over the target rows."""
    rows = [predict_row(row) for row in published_rows()]
    target = [abs(r.error) for r in rows if r.in_target]
    return rows, statistics.median(target)


def fit_sequence_expert_cv() -> float:
    """Return the per-sequence expert-load variation that best matches the published EPLB pairs' ratios.

    For each pair, the model's perfect-routing / real-routing throughput ratio should equal the published
    projection / measurement ratio (CM-v2 Table 3: 6,688 / 5,655; SGLang: 7,417 / 6,288). Grid search on
    squared log error, step 0.1. This fits a ratio, not any row's throughput.
    """
    by_id = {row["id"]: row for row in published_rows()}

    def loss(cv: float) -> float:
        total = 0.0
        for measured_id, perfect_id in EPLB_PAIRS:
            measured, perfect = by_id[measured_id], by_id[perfect_id]
            published_ratio = float(perfect["tokens_per_s_per_device"]) / float(measured["tokens_per_s_per_device"])
            predicted_ratio = predict_row(perfect, cv).predicted / predict_row(measured, cv).predicted
            total += math.log(predicted_ratio / published_ratio) ** 2
        return total

    grid = [round(0.1 * i, 1) for i in range(0, 61)]
    return min(grid, key=loss)
