"""Per-rank roofline: an operation takes the longer of its compute time and its memory time.

Peaks come from the fabric (per device, divided among its dies) times the achievable fractions kept beside the
fabric (`device.efficiency`): `gemm` for linear layers in the plan's precision, `attention` for attention scores
and values (bf16), `hbm` for memory traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.perf.spec import Precision

OpKind = Literal["gemm", "attention"]
_TFLOPS = 1e12
_GBS = 1e9
_US_PER_S = 1e6


@dataclass(frozen=True)
class RankPeaks:
    """Achievable rates of one rank: FLOP/s for GEMMs (in the plan's precision) and attention, HBM bytes/s."""

    gemm_flops: float
    attention_flops: float
    hbm_bytes: float
    hbm_capacity_bytes: float

    def op_us(self, flops: float, bytes_moved: float, kind: OpKind = "gemm") -> float:
        """Return the microseconds of one op: max(compute time, memory time)."""
        rate = self.gemm_flops if kind == "gemm" else self.attention_flops
        return max(flops / rate, bytes_moved / self.hbm_bytes) * _US_PER_S


def rank_peaks(fabric: FabricSpec, precision: Precision) -> RankPeaks:
    """Return the achievable peaks of one rank of `fabric` when linear layers run in `precision`."""
    device = fabric.device
    peaks = device.peak_tflops
    if precision not in peaks:
        known = ", ".join(sorted(peaks))
        raise UserError(
            f"{device.kind} ({fabric.name}) has no {precision} peak; choose --precision from: {known}"
            + (" (Ascend 910C has no native FP8: use int8)" if precision == "fp8" else "")
        )
    bf16_tflops = peaks.get("bf16") or peaks.get("fp16") or peaks[precision]
    dies = device.dies_per_device
    eff = device.efficiency
    return RankPeaks(
        gemm_flops=peaks[precision] / dies * _TFLOPS * eff.gemm,
        attention_flops=bf16_tflops / dies * _TFLOPS * eff.attention,
        hbm_bytes=device.hbm_gbs / dies * _GBS * eff.hbm,
        hbm_capacity_bytes=device.hbm_gib / dies * 2**30,
    )
