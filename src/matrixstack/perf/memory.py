"""What one rank must hold: weights, KV cache, activations and communication buffers.

Weights per rank: attention and dense FFN split over tp, experts by the rank's expert slots, the shared expert
on every rank (or on the ranks dedicated to it), embedding and LM head in bf16, the MTP module when MTP is on;
pipeline stages divide the layers. KV cache: the rank's sequences at their longest context (input + output),
MLA's latent whole on every TP rank, GQA's kv heads split over tp. Activations: half of one microbatch's
activation traffic is live at once. Communication buffers: CloudMatrix-Infer's sizing, ranks x tokens x
(dispatch + combine message) per microbatch (CM-v2 §4.2.1). A rank may fill `USABLE_HBM_FRACTION` of its HBM;
the rest is the runtime's (graphs, allocator slack, workspace).
"""

from __future__ import annotations

from dataclasses import dataclass

from matrixstack.arch.spec import Arch
from matrixstack.dtypes import BYTES_PER_ELEMENT
from matrixstack.perf.spec import InstancePlan, PhaseName, Workload
from matrixstack.perf.step import BF16_BYTES, Layout, activation_bytes_per_token, dispatch_bytes_per_token

USABLE_HBM_FRACTION = 0.9  # ASSUMPTION: ~10% of device memory goes to the runtime, as vLLM's default 0.9
GIB = 2**30


@dataclass(frozen=True)
class MemoryUse:
    """Bytes one rank needs, by term, against its capacity."""

    weights: float
    kv_cache: float
    activations: float
    comm_buffers: float
    capacity: float

    @property
    def total(self) -> float:
        """Return the bytes of all terms."""
        return self.weights + self.kv_cache + self.activations + self.comm_buffers

    @property
    def fits(self) -> bool:
        """Return True when every term together fits the rank's usable memory."""
        return self.total <= self.capacity

    def terms_gib(self) -> dict[str, float]:
        """Return each term and the capacity in GiB, rounded for reports."""
        return {
            "weights": round(self.weights / GIB, 2),
            "kv_cache": round(self.kv_cache / GIB, 2),
            "activations": round(self.activations / GIB, 2),
            "comm_buffers": round(self.comm_buffers / GIB, 2),
            "total": round(self.total / GIB, 2),
            "capacity": round(self.capacity / GIB, 2),
        }

    def why_not(self) -> str:
        """Return a sentence naming the largest term and the overflow, for a plan that does not fit."""
        terms = self.terms_gib()
        largest = max(("weights", "kv_cache", "activations", "comm_buffers"), key=lambda k: terms[k])
        over = (self.total - self.capacity) / GIB
        listed = ", ".join(f"{k} {terms[k]:g} GiB" for k in ("weights", "kv_cache", "activations", "comm_buffers"))
        return (
            f"needs {terms['total']:g} GiB per rank ({listed}) but {terms['capacity']:g} GiB are usable: "
            f"over by {over:.2f} GiB; the largest term is {largest}"
        )


def weight_bytes_per_rank(arch: Arch, workload: Workload, layout: Layout) -> float:
    """Return the weight bytes one rank holds under `layout`."""
    w = BYTES_PER_ELEMENT[workload.precision]
    stage = 1 / layout.pp
    total = arch.layers * arch.attention_params_per_layer() / layout.tp * w * stage
    total += arch.dense_layer_count() * arch.dense_ffn_params() / layout.tp * w * stage
    moe_layer_on_rank = 0.0
    if arch.ffn.moe is not None:
        experts = layout.slots_per_rank * arch.expert_params()
        shared = 0 if layout.shared_ranks else arch.shared_expert_params()
        moe_layer_on_rank = experts + shared + arch.router_params()
        total += arch.moe_layer_count() * moe_layer_on_rank * w * stage
    total += (arch.embedding_params() + arch.lm_head_params()) * BF16_BYTES
    if workload.mtp_acceptance > 0 and arch.mtp_layers:
        # the MTP module's experts spread over the EP ranks like the main model's
        spread = arch.mtp_params() - arch.mtp_layers * (arch.moe_ffn_params() - moe_layer_on_rank)
        total += spread * w
    return total


def memory_per_rank(
    arch: Arch,
    workload: Workload,
    instance: InstancePlan,
    layout: Layout,
    phase: PhaseName,
    dies: int,
    hbm_bytes: float,
) -> MemoryUse:
    """Return what one rank of `instance` must hold in `phase`."""
    if phase == "decode":
        sequences = instance.batch_per_device / dies
        context = workload.input_len + workload.output_len
        tokens = sequences * workload.tokens_verified_per_step
    else:
        sequences = instance.batch_per_device / dies / workload.input_len
        context = workload.input_len
        tokens = instance.batch_per_device / dies
    kv_shards = 1 if arch.attention.mla else min(layout.tp, arch.attention.kv_heads)
    kv_sequences = sequences * (layout.tp if arch.attention.mla else 1)
    # with pp, a rank holds pp times the sequences for 1/pp of the layers: the same KV bytes
    kv = kv_sequences * context * arch.kv_bytes_per_token(workload.kv_dtype) / kv_shards
    micro = tokens / instance.microbatches
    activations = micro * activation_bytes_per_token(arch, phase, arch.ffn.moe is not None) / 2
    comm = 0.0
    if arch.ffn.moe is not None and layout.ep > 1:
        message = dispatch_bytes_per_token(arch, workload.precision) + arch.hidden_size * BF16_BYTES
        if phase == "decode":
            comm = layout.ep * micro * message
        else:
            comm = 2 * micro * arch.ffn.moe.experts_per_token * message
    weights = weight_bytes_per_rank(arch, workload, layout)
    return MemoryUse(weights, kv, activations, comm, hbm_bytes * USABLE_HBM_FRACTION)
