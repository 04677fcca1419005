"""What the perf layer is asked about: a workload, service-level objectives and a plan. Data only.

Counting conventions (as the papers report them): a *device* is an accelerator package (an Ascend 910C NPU,
an H800 GPU); a *rank* is what software addresses (a die on the 910C, two per NPU). Parallel degrees (tp, dp,
ep) count ranks. Batch and throughput figures are per device.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from matrixstack.dtypes import Dtype
from matrixstack.specio import Strict

Precision = Literal["fp32", "bf16", "fp8", "int8"]
PhaseName = Literal["prefill", "decode"]


class Workload(Strict):
    """The requests a deployment serves and how it computes them."""

    input_len: int = Field(4096, gt=0, description="integer prompt tokens per request")
    output_len: int = Field(256, gt=0, description="integer generated tokens per request")
    kv_len: int | None = Field(
        None, gt=0, description="integer mean context held in the KV cache during decode (default input + output/2)"
    )
    precision: Precision = Field("int8", description="weights and GEMMs: fp32, bf16, fp8 or int8")
    kv_dtype: Dtype = Field("bf16", description="KV-cache dtype")
    mtp_acceptance: float = Field(
        0.0, ge=0, le=1, description="number in [0, 1]: acceptance of one MTP draft token; 0 turns MTP off"
    )
    expert_skew: float = Field(
        0.0, ge=0, description="number >= 0, Zipf exponent of expert popularity; 0 is perfect balance"
    )
    sequence_expert_cv: float = Field(
        0.0,
        ge=0,
        description="number >= 0, how unevenly one sequence spreads over experts (coefficient of variation)",
    )

    @property
    def decode_context(self) -> int:
        """Return the context length a decode step attends to."""
        return self.kv_len or self.input_len + self.output_len // 2

    @property
    def tokens_per_step(self) -> float:
        """Return the tokens a sequence emits per decode step (1 + MTP acceptance)."""
        return 1.0 + self.mtp_acceptance

    @property
    def tokens_verified_per_step(self) -> int:
        """Return the tokens a sequence runs through the model per decode step (2 with one MTP draft)."""
        return 2 if self.mtp_acceptance > 0 else 1


class Slo(Strict):
    """Latency targets: time per output token and time to first token."""

    tpot_ms: float = Field(50.0, gt=0, description="number, time per output token target in milliseconds")
    ttft_ms: float = Field(2000.0, gt=0, description="number, time to first token target in milliseconds")


class InstancePlan(Strict):
    """One prefill or decode instance: its size, parallel degrees and batch, and how many run."""

    devices: int = Field(gt=0, description="integer devices in one instance")
    tp: int = Field(1, gt=0, description="integer attention tensor-parallel degree, in ranks")
    pp: int = Field(1, gt=0, description="integer pipeline stages")
    ep: int = Field(gt=0, description="integer expert-parallel degree, in ranks")
    batch_per_device: float = Field(
        gt=0, description="number: decode sequences per device, or prefill tokens per device per batch"
    )
    microbatches: int = Field(2, ge=1, le=4, description="integer microbatches overlapping compute and comms")
    redundant_experts: int = Field(0, ge=0, description="integer extra copies of hot experts per instance")
    instances: int = Field(1, gt=0, description="integer instances of this kind")

    @model_validator(mode="after")
    def _degrees(self) -> InstancePlan:
        if self.tp & (self.tp - 1):
            raise ValueError(f"tp must be a power of two, got {self.tp}")
        return self

    def ranks(self, dies_per_device: int) -> int:
        """Return the ranks (dies or devices) of one instance."""
        return self.devices * dies_per_device

    def dp(self, dies_per_device: int) -> int:
        """Return the attention data-parallel degree: ranks per pipeline stage / tp."""
        return self.ranks(dies_per_device) // (self.pp * self.tp)


class Plan(Strict):
    """A deployment's plan: prefill instances and decode instances (disaggregated)."""

    prefill: InstancePlan
    decode: InstancePlan

    def devices(self) -> int:
        """Return all devices the plan uses."""
        return self.prefill.devices * self.prefill.instances + self.decode.devices * self.decode.instances
