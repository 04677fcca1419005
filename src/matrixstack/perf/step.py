"""Time of one decode step and one prefill batch of a plan's instance, term by term.

Per rank and per layer, for each of `m` microbatches of t tokens (the rank's tokens / m):

  attention   projections: GEMM of 2·t·P_attn FLOPs reading P_attn/tp weights;
              scores and values: `arch.attention_flops_per_token` per token at the step's context (attention
              rate), reading the KV cache of the rank's TP group (MLA's latent is shared by all heads, so
              every TP rank reads all of it; GQA splits kv heads over tp);
              TP all-reduce of the output when tp > 1.
  dense FFN   GEMM of 2·t·P_ffn FLOPs reading P_ffn/tp weights (+ TP all-reduce).
  MoE         router GEMM; dispatch all-to-all of t·k token copies (plus one to a shared-expert rank when
              the instance dedicates ranks to shared experts, as CloudMatrix-Infer's EP320 does); routed
              experts: the busiest rank receives t·k·(EP/routed ranks)·imbalance copies and reads each of its
              experts' weights once; shared experts on every rank (or on their dedicated ranks); combine
              all-to-all in bf16.
  LM head     per step (decode) or per sequence (prefill), bf16.
  MTP         the draft module costs one more MoE layer and LM head per decode step when MTP is on.

Each op is a roofline (`RankPeaks.op_us`). Communication overlaps compute across microbatches (DeepSeek's and
CloudMatrix-Infer's two-microbatch pipelining): a layer takes compute + comm - min(compute, comm)·(m-1)/m.
Splitting into microbatches is not free: each one reads the weights again. Pipeline stages (pp) keep pp groups
of sequences in flight: the work per device is unchanged, the weights per device shrink by pp, and each stage
boundary adds an activation hand-off per microbatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from matrixstack.arch.spec import Arch
from matrixstack.dtypes import BYTES_PER_ELEMENT
from matrixstack.fabric import collectives
from matrixstack.fabric.group import DeviceGroup
from matrixstack.fabric.spec import FabricSpec
from matrixstack.perf.imbalance import imbalance_factor
from matrixstack.perf.roofline import RankPeaks, rank_peaks
from matrixstack.perf.spec import InstancePlan, PhaseName, Workload

BF16_BYTES = 2
INT8_SCALE_BYTES = 512  # CANN pads a token's INT8 scale to 512 B (CM-v2 §4.2.1)
FP8_SCALE_BYTES_PER_128 = 4  # DeepEP: one fp32 scale per 128 values


@dataclass
class StepTime:
    """The time of one step (decode) or batch (prefill) with its terms, per rank, in microseconds."""

    phase: PhaseName
    time_us: float
    tokens_per_rank: float
    terms_us: dict[str, float] = field(default_factory=dict)
    imbalance: float = 1.0

    def add(self, term: str, time_us: float) -> None:
        """Accumulate `time_us` under `term`."""
        self.terms_us[term] = self.terms_us.get(term, 0.0) + time_us


@dataclass(frozen=True)
class Layout:
    """How an instance's ranks are used: the derived numbers every term needs."""

    ranks: int
    tp: int
    pp: int
    ep: int
    routed_ranks: int
    shared_ranks: int
    slots_per_rank: int
    imbalance: float


def expert_layout(arch: Arch, instance: InstancePlan, ranks: int, skew: float, drift_cv: float = 0.0) -> Layout:
    """Return the layout of an instance: routed and shared-expert ranks, slots per rank, imbalance.

    `drift_cv` is the variation of each expert's load in one batch around the placement's plan (imbalance.py).

    Raises ValueError when the experts cannot be spread over the EP ranks (the plan search skips such plans).
    """
    ep, tp, pp = instance.ep, instance.tp, instance.pp
    if ranks % (tp * pp) or (ranks // pp) % ep:
        raise ValueError(f"{ranks} ranks do not split into tp={tp}, pp={pp}, ep={ep}")
    moe = arch.ffn.moe
    if moe is None:
        return Layout(ranks, tp, pp, ep, 0, 0, 0, 1.0)
    slots = moe.routed_experts + instance.redundant_experts
    if slots <= ep:
        routed_ranks, shared_ranks = slots, ep - slots
        if shared_ranks and not moe.shared_experts:
            raise ValueError(f"ep={ep} leaves {shared_ranks} ranks idle: {slots} expert slots")
    elif slots % ep == 0:
        routed_ranks, shared_ranks = ep, 0
    else:
        raise ValueError(f"{slots} expert slots do not divide over ep={ep}")
    per_rank = slots // routed_ranks
    imbalance = imbalance_factor(moe.routed_experts, instance.redundant_experts, routed_ranks, skew, drift_cv)
    return Layout(ranks, tp, pp, ep, routed_ranks, shared_ranks, per_rank, imbalance)


def activation_bytes_per_token(arch: Arch, phase: PhaseName, moe_layer: bool) -> float:
    """Return the bytes one token's activations move through HBM in one layer outside the GEMMs.

    Memory-bound elementwise work: two norms and two residual adds (~10 hidden vectors read or written);
    attention's materialised q, k, v and output, each written once and read once (MLA prefill decompresses
    k and v per head; MLA decode works on the latent); the FFN's gate/up output, its SwiGLU product and its
    down-projection output, each written and read, for every expert copy of the token. All in bf16.
    """
    h, att = arch.hidden_size, arch.attention
    if att.mla is not None:
        mla = att.mla
        if phase == "prefill":
            qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
            per_head = 2 * qk + 2 * mla.v_head_dim
        else:
            per_head = 2 * (mla.kv_lora_rank + mla.qk_rope_head_dim) + 2 * mla.kv_lora_rank
        attention = 2 * att.heads * per_head
    else:
        attention = 2 * (2 * att.heads * att.head_dim + 2 * att.kv_heads * att.head_dim)
    moe = arch.ffn.moe
    if moe_layer and moe is not None:
        copies, intermediate = moe.experts_per_token + moe.shared_experts, moe.expert_intermediate
    else:
        copies, intermediate = 1, arch.ffn.dense_intermediate or 0
    ffn = copies * (2 * h + 2 * 2 * intermediate + 2 * intermediate + 2 * h)
    return BF16_BYTES * (10 * h + attention + ffn)


def kernels_per_layer(arch: Arch, moe_layer: bool, active_experts: float | None = None) -> tuple[float, int]:
    """Return (matrix kernels, vector kernels) one layer launches per microbatch.

    Matrix: MLA's five projections (q down/up, kv down, absorbed kv up, output) or GQA's fused qkv and output,
    plus the attention kernel; an MoE layer's router, grouped gate-up and down GEMMs for routed experts (one each,
    or two per active expert when `active_experts` is given: a runtime whose grouped GEMM runs one GEMM per
    expert) and the same two for shared experts; a dense FFN's two. Vector: two norms, two residual adds, RoPE,
    SwiGLU; an MoE layer adds top-k, quantisation, permute, un-permute and the shared expert's SwiGLU.
    """
    matmuls: float = (5 if arch.attention.mla else 2) + 1
    vectors = 6
    moe = arch.ffn.moe
    if moe_layer and moe is not None:
        matmuls += 1 + (2 if active_experts is None else 2 * active_experts) + (2 if moe.shared_experts else 0)
        vectors += 4 + (1 if moe.shared_experts else 0)
    else:
        matmuls += 2
    return matmuls, vectors


def active_experts_per_rank(arch: Arch, group_tokens: float, slots_per_rank: int) -> float:
    """Return how many of a rank's `slots_per_rank` routed experts at least one of `group_tokens` tokens (the whole
    EP group's microbatch) picks, on average: each token picks k of E experts, so an expert stays idle with
    probability (1 - k/E) ** tokens (uniform routing; skew would leave a few more idle)."""
    moe = arch.ffn.moe
    idle = (1 - moe.experts_per_token / moe.routed_experts) ** max(group_tokens, 0.0)
    return slots_per_rank * (1 - idle)


def expected_remote_nodes(arch: Arch, ep_nodes: int) -> float:
    """Return how many other nodes one token's routed experts sit on, on average, with EP over `ep_nodes` nodes.

    Group-limited routing (DeepSeek-V3: 8 groups, 4 chosen) with groups spread evenly over nodes; plain top-k
    routing otherwise. A library that sends once per node (DeepEP normal kernels) moves this many copies.
    """
    moe = arch.ffn.moe
    if moe is None or ep_nodes <= 1:
        return 0.0
    if moe.groups > 1 and moe.groups % ep_nodes == 0:
        per_node = moe.groups // ep_nodes
        untouched = math.comb(moe.groups - per_node, moe.topk_groups) / math.comb(moe.groups, moe.topk_groups)
    else:
        untouched = (1 - 1 / ep_nodes) ** moe.experts_per_token
    return ep_nodes * (1 - untouched) * (ep_nodes - 1) / ep_nodes


def dispatch_bytes_per_token(arch: Arch, precision: str) -> float:
    """Return the bytes one token copy takes in an MoE dispatch: quantised with its scales, or bf16."""
    hidden = arch.hidden_size
    if precision == "int8":
        return hidden + INT8_SCALE_BYTES
    if precision == "fp8":
        return hidden + hidden / 128 * FP8_SCALE_BYTES_PER_128
    return hidden * BYTES_PER_ELEMENT[precision]


class StepModel:
    """Predicts step times of one arch on one fabric under one workload, for any instance plan."""

    def __init__(self, arch: Arch, fabric: FabricSpec, workload: Workload):
        self.arch = arch
        self.fabric = fabric
        self.workload = workload
        self.peaks: RankPeaks = rank_peaks(fabric, workload.precision)
        self.weight_bytes = BYTES_PER_ELEMENT[workload.precision]
        self.kv_bytes_per_token_layer = arch.kv_bytes_per_token(workload.kv_dtype) / arch.layers
        self.dies = fabric.device.dies_per_device
        self._comm_cache: dict[tuple, object] = {}

    # -- communication -------------------------------------------------------------------------------
    def _comm_us(self, op: str, group_ranks: int, size_bytes: float, scale_out_share: float | None = None) -> float:
        """Return the time of a collective on the first `group_ranks` ranks.

        An all-to-all's predicted time is affine in its size, so its two coefficients are computed once per
        group; all-reduces are cached by size rounded to three significant figures.
        """
        if group_ranks <= 1 or size_bytes <= 0:
            return 0.0
        if op == "a2a":
            key = ("a2a", group_ranks, scale_out_share)
            if key not in self._comm_cache:
                group = DeviceGroup.first(self.fabric, group_ranks)
                one = collectives.all_to_all(group, 1e6, scale_out_share=scale_out_share).time_us
                two = collectives.all_to_all(group, 2e6, scale_out_share=scale_out_share).time_us
                self._comm_cache[key] = (one - (two - one), (two - one) / 1e6)
            intercept, slope = self._comm_cache[key]
            return intercept + slope * size_bytes
        size = float(f"{size_bytes:.3g}")
        key = ("ar", group_ranks, size)
        if key not in self._comm_cache:
            self._comm_cache[key] = collectives.all_reduce(DeviceGroup.first(self.fabric, group_ranks), size).time_us
        return self._comm_cache[key]

    def _scale_out_share(self, ep: int, copies: int, phase: PhaseName) -> float | None:
        """Return the share of a dispatch that crosses the scale-out plane after per-node deduplication.

        Only prefill deduplicates: throughput kernels (DeepEP normal mode) send a token once per remote node and
        forward it in the node; decode's low-latency kernels send every copy straight to its expert's rank.
        """
        ranks_per_domain = self.fabric.scale_up_domain_size * self.dies
        if phase == "decode" or ep <= ranks_per_domain:
            return None
        ranks_per_node = self.fabric.device.devices_per_node * self.dies
        return expected_remote_nodes(self.arch, math.ceil(ep / ranks_per_node)) / copies

    # -- one layer -----------------------------------------------------------------------------------
    def _attention(self, step: StepTime, tokens: float, phase: PhaseName, context: int, layout: Layout) -> None:
        arch, peaks = self.arch, self.peaks
        params = arch.attention_params_per_layer()
        step.add("attention_proj", peaks.op_us(2 * tokens * params, params / layout.tp * self.weight_bytes))
        flops = tokens * arch.attention_flops_per_token(phase, context) / arch.layers
        kv_shards = 1 if arch.attention.mla else min(layout.tp, arch.attention.kv_heads)
        if phase == "decode":
            sequences = layout.tp * tokens / self.workload.tokens_verified_per_step
            kv_read = sequences * context * self.kv_bytes_per_token_layer / kv_shards
        else:
            kv_read = tokens * self.kv_bytes_per_token_layer  # prefill writes its KV once
        step.add("attention_core", peaks.op_us(flops, kv_read, "attention"))
        if layout.tp > 1:
            step.add("tp_allreduce", self._comm_us("ar", layout.tp, layout.tp * tokens * arch.hidden_size * 2))

    def _dense_ffn(self, step: StepTime, tokens: float, layout: Layout) -> None:
        params = self.arch.dense_ffn_params()
        step.add("dense_ffn", self.peaks.op_us(2 * tokens * params, params / layout.tp * self.weight_bytes))
        if layout.tp > 1:
            step.add("tp_allreduce", self._comm_us("ar", layout.tp, layout.tp * tokens * self.arch.hidden_size * 2))

    def _moe(self, step: StepTime, tokens: float, layout: Layout) -> tuple[float, float]:
        """Add the MoE terms of one layer for one microbatch; return (compute_us, comm_us)."""
        arch, peaks = self.arch, self.peaks
        moe = arch.ffn.moe
        assert moe is not None
        k = moe.experts_per_token
        copies = k + (1 if layout.shared_ranks else 0)
        router = peaks.op_us(2 * tokens * arch.router_params(), arch.router_params() * BF16_BYTES)
        share = self._scale_out_share(layout.ep, copies, step.phase)
        dispatch_bytes = tokens * copies * dispatch_bytes_per_token(arch, self.workload.precision)
        # the busiest rank receives (dispatch) and returns (combine) `imbalance` times the mean traffic
        dispatch = self._comm_us("a2a", layout.ep, dispatch_bytes * layout.imbalance, share)
        combine_bytes = tokens * copies * arch.hidden_size * BF16_BYTES * layout.imbalance
        combine = self._comm_us("a2a", layout.ep, combine_bytes, share)
        received = tokens * k * layout.ep / layout.routed_ranks * layout.imbalance
        expert = arch.expert_params()
        routed = peaks.op_us(2 * received * expert, layout.slots_per_rank * expert * self.weight_bytes)
        shared_params = arch.shared_expert_params()
        if layout.shared_ranks:
            shared_tokens = tokens * layout.ep / layout.shared_ranks
            expert_us = max(routed, peaks.op_us(2 * shared_tokens * shared_params, shared_params * self.weight_bytes))
        else:
            shared = peaks.op_us(2 * tokens * shared_params, shared_params * self.weight_bytes) if shared_params else 0
            expert_us = routed + shared
        step.add("moe_router", router)
        step.add("moe_experts", expert_us)
        step.add("moe_dispatch", dispatch)
        step.add("moe_combine", combine)
        return router + expert_us, dispatch + combine

    def _kernel_overhead_us(self, moe_layer: bool, tokens: float, layout: Layout) -> float:
        """Return the fixed kernel costs of one layer for one microbatch of `tokens` per rank (`kernels_per_layer`;
        with `grouped_gemm_per_expert`, the expected active experts of the rank from `active_experts_per_rank`)."""
        eff = self.fabric.device.efficiency
        active = None
        if moe_layer and eff.grouped_gemm_per_expert:
            active = active_experts_per_rank(self.arch, tokens * layout.ep, layout.slots_per_rank)
        matmuls, vectors = kernels_per_layer(self.arch, moe_layer, active)
        return matmuls * eff.matmul_kernel_us + vectors * eff.vector_kernel_us

    def _layer(self, tokens: float, phase: PhaseName, context: int, layout: Layout, moe_layer: bool) -> StepTime:
        """Return the terms of one layer for one microbatch of `tokens` tokens on a rank."""
        step = StepTime(phase, 0.0, tokens)
        step.add("kernel_overhead", self._kernel_overhead_us(moe_layer, tokens, layout))
        step.add("activations", self.peaks.op_us(0, tokens * activation_bytes_per_token(self.arch, phase, moe_layer)))
        self._attention(step, tokens, phase, context, layout)
        if moe_layer:
            self._moe(step, tokens, layout)
        else:
            self._dense_ffn(step, tokens, layout)
        return step

    # -- whole steps ---------------------------------------------------------------------------------
    def drift_cv(self, instance: InstancePlan, phase: PhaseName) -> float:
        """Return the load variation of an expert in one microbatch: per-sequence variation / sqrt(sequences).

        A microbatch of the EP group holds ep x (sequences per rank) / microbatches sequences; rounded to 0.01
        so that nearby batches share the cached imbalance.
        """
        cv = self.workload.sequence_expert_cv
        if cv == 0:
            return 0.0
        per_device = (
            instance.batch_per_device if phase == "decode" else instance.batch_per_device / self.workload.input_len
        )
        sequences = max(1.0, instance.ep * per_device / self.dies / instance.microbatches)
        return round(cv / math.sqrt(sequences), 2)

    def _run(self, phase: PhaseName, instance: InstancePlan, tokens_per_rank: float, context: int) -> StepTime:
        layout = expert_layout(
            self.arch, instance, instance.ranks(self.dies), self.workload.expert_skew, self.drift_cv(instance, phase)
        )
        m = instance.microbatches
        micro = tokens_per_rank / m
        result = StepTime(phase, 0.0, tokens_per_rank, imbalance=layout.imbalance)
        kinds = [(True, self.arch.moe_layer_count()), (False, self.arch.dense_layer_count())]
        if phase == "decode" and self.workload.mtp_acceptance > 0 and self.arch.mtp_layers:
            kinds.append((self.arch.ffn.moe is not None, self.arch.mtp_layers))
        comm_terms = ("moe_dispatch", "moe_combine", "tp_allreduce")
        for moe_layer, count in kinds:
            if not count:
                continue
            layer = self._layer(micro, phase, context, layout, moe_layer)
            comm = sum(layer.terms_us.get(t, 0.0) for t in comm_terms) * m
            compute = sum(v for t, v in layer.terms_us.items() if t not in comm_terms) * m
            hidden = min(compute, comm) * (m - 1) / m
            for term, value in layer.terms_us.items():
                result.add(term, value * m * count)
            result.add("overlap_saved", -hidden * count)
            result.time_us += (compute + comm - hidden) * count
        lm_tokens = tokens_per_rank if phase == "decode" else tokens_per_rank / self.workload.input_len
        lm_params = self.arch.vocab_size * self.arch.hidden_size
        lm_heads = 2 if phase == "decode" and self.workload.mtp_acceptance > 0 and self.arch.mtp_layers else 1
        lm_us = lm_heads * self.peaks.op_us(2 * lm_tokens * lm_params, lm_params * BF16_BYTES)
        result.add("lm_head", lm_us)
        result.time_us += lm_us
        if instance.pp > 1:
            handoff = self._comm_us("ar", 2, micro * self.arch.hidden_size * BF16_BYTES) / 2
            result.add("pp_handoff", handoff * m * (instance.pp - 1))
            result.time_us += handoff * m * (instance.pp - 1)
        return result

    def decode_step(self, instance: InstancePlan) -> StepTime:
        """Return the time of one decode step with `instance.batch_per_device` sequences per device.

        With pp stages a device holds 1/pp of the layers for pp times the sequences, so its work per step is
        the same token-layers as without pipelining; pipelining saves weight memory and costs hand-offs.
        """
        tokens = instance.batch_per_device / self.dies * self.workload.tokens_verified_per_step
        return self._run("decode", instance, tokens, self.workload.decode_context)

    def prefill_batch(self, instance: InstancePlan) -> StepTime:
        """Return the time of one prefill batch of `instance.batch_per_device` tokens per device."""
        return self._run("prefill", instance, instance.batch_per_device / self.dies, self.workload.input_len)

    def kv_transfer_us(self) -> float:
        """Return the time to move one request's KV cache from a prefill to a decode instance.

        CloudMatrix-Infer moves it over the RDMA plane to keep it off the UB decode traffic (CM-v2 §4.3.3);
        fabrics without a scale-out plane use the scale-up bus.
        """
        size = self.workload.input_len * self.arch.kv_bytes_per_token(self.workload.kv_dtype)
        plane = "scale_out" if self.fabric.plane("scale_out") else None
        ranks_per_node = self.fabric.device.devices_per_node * self.dies
        # a decode instance on another node when there is one, else the last rank of the only node
        target = ranks_per_node if self.fabric.node_count > 1 else self.fabric.die_count - 1
        return collectives.p2p(self.fabric, 0, target, size, plane).time_us
