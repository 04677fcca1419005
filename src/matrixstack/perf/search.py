"""Plan search: the best prefill and decode instances under SLOs, their Pareto front, and the P/D split.

For each phase the search enumerates instance skeletons — devices per instance, attention tp, expert slots
(redundant experts), microbatches — and for each finds the largest batch that fits in memory and meets the SLO
(decode: TPOT; prefill: TTFT = batch time + KV hand-off), by bisection, since step time grows with batch.
Throughput per device at that batch ranks the skeletons. Pins (`decode.ep=320`, ...) fix fields and search the
rest. The prefill:decode split then matches request rates (TensorRT-LLM's rate-matching rule,
published_results.md §6.5) within the device budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matrixstack.arch.spec import Arch
from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.perf.memory import MemoryUse, memory_per_rank
from matrixstack.perf.spec import InstancePlan, PhaseName, Plan, Slo, Workload
from matrixstack.perf.step import StepModel, StepTime, expert_layout

# Zipf exponent of expert popularity under real routing with EPLB. ASSUMPTION, not fitted to a published row:
# mild skew; 0.9 would be unbalanced production traffic (xDeepServe, see imbalance.py).
DEFAULT_EXPERT_SKEW = 0.2
DEFAULT_SEQUENCE_EXPERT_CV = 3.2
PIN_FIELDS = ("devices", "tp", "pp", "ep", "batch_per_device", "microbatches", "redundant_experts", "instances")
_DEVICE_STEPS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160, 192, 256, 288, 320, 384, 512, 768, 1024)


@dataclass
class InstanceResult:
    """The best instance found for a phase, with its step, memory and rates."""

    phase: PhaseName
    instance: InstancePlan
    step: StepTime
    memory: MemoryUse
    tokens_per_s_per_device: float
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    largest_batch_that_fits: float = 0.0

    def to_dict(self, dies: int) -> dict[str, object]:
        """Return the instance as the JSON the CLI prints."""
        inst = self.instance
        return {
            "devices": inst.devices,
            "instances": inst.instances,
            "tp": inst.tp,
            "dp": inst.dp(dies),
            "ep": inst.ep,
            "pp": inst.pp,
            "batch": inst.batch_per_device,
            "largest_batch_that_fits": self.largest_batch_that_fits,
            "microbatches": inst.microbatches,
            "redundant_experts": inst.redundant_experts,
            "tokens_per_s_per_device": round(self.tokens_per_s_per_device, 1),
            "step_ms": round(self.step.time_us / 1e3, 3),
            "step_terms_ms": {k: round(v / 1e3, 3) for k, v in self.step.terms_us.items()},
            "expert_imbalance": round(self.step.imbalance, 3),
            "memory_gib_per_rank": self.memory.terms_gib(),
        }


class PhaseSearch:
    """Evaluates instances of one phase: step time, memory, SLO and throughput."""

    def __init__(self, arch: Arch, fabric: FabricSpec, workload: Workload, slo: Slo, phase: PhaseName):
        self.arch, self.fabric, self.workload, self.slo, self.phase = arch, fabric, workload, slo, phase
        self.model = StepModel(arch, fabric, workload)
        self.dies = fabric.device.dies_per_device
        self.kv_transfer_ms = self.model.kv_transfer_us() / 1e3 if phase == "prefill" else 0.0

    def memory(self, instance: InstancePlan) -> MemoryUse:
        """Return the memory one rank of `instance` needs."""
        layout = expert_layout(
            self.arch,
            instance,
            instance.ranks(self.dies),
            self.workload.expert_skew,
            self.model.drift_cv(instance, self.phase),
        )
        return memory_per_rank(
            self.arch, self.workload, instance, layout, self.phase, self.dies, self.model.peaks.hbm_capacity_bytes
        )

    def evaluate(self, instance: InstancePlan) -> InstanceResult:
        """Return the step, memory and rates of `instance` (whether or not it meets the SLO)."""
        if self.phase == "decode":
            step = self.model.decode_step(instance)
            tpot_ms = step.time_us / 1e3 / self.workload.tokens_per_step
            rate = instance.batch_per_device * self.workload.tokens_per_step / (step.time_us / 1e6)
            return InstanceResult("decode", instance, step, self.memory(instance), rate, tpot_ms=tpot_ms)
        step = self.model.prefill_batch(instance)
        rate = instance.batch_per_device / (step.time_us / 1e6)
        ttft_ms = step.time_us / 1e3 + self.kv_transfer_ms
        return InstanceResult("prefill", instance, step, self.memory(instance), rate, ttft_ms=ttft_ms)

    def meets_slo(self, result: InstanceResult) -> bool:
        """Return True when the result fits in memory and meets the phase's latency target."""
        if not result.memory.fits:
            return False
        if self.phase == "decode":
            return result.tpot_ms is not None and result.tpot_ms <= self.slo.tpot_ms
        return result.ttft_ms is not None and result.ttft_ms <= self.slo.ttft_ms

    def batch_unit(self) -> int:
        """Return the step between batch sizes: a sequence (decode) or a prompt's tokens (prefill)."""
        return 1 if self.phase == "decode" else self.workload.input_len

    def largest_fitting_batch(self, instance: InstancePlan, limit_units: int = 1 << 16) -> float:
        """Return the largest batch per device (sequences or tokens) whose memory fits, whatever the SLO."""
        unit = self.batch_unit()

        def fits(units: int) -> bool:
            return self.memory(instance.model_copy(update={"batch_per_device": float(units * unit)})).fits

        return float(_largest_true(fits, limit_units) * unit)

    def largest_batch(self, skeleton: InstancePlan, limit_units: int = 4096) -> InstanceResult | None:
        """Return the instance with the largest batch meeting memory and SLO, or None if even one unit fails."""
        unit = self.batch_unit()

        def at(units: int) -> InstanceResult:
            return self.evaluate(skeleton.model_copy(update={"batch_per_device": float(units * unit)}))

        units = _largest_true(lambda n: self.meets_slo(at(n)), limit_units)
        return at(units) if units else None


def _largest_true(predicate, limit: int) -> int:
    """Return the largest n in 1..limit with predicate(n) true, assuming it is true up to some n; 0 if none.

    Doubling then bisection: O(log limit) calls of `predicate`.
    """
    if not predicate(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and predicate(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predicate(mid) else (lo, mid)
    return lo


def _divisors_up_to(n: int, cap: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16) if d <= cap and n % d == 0]


def _redundancy_options(arch: Arch, ep: int) -> list[int]:
    """Return redundant-expert counts that spread the experts evenly over `ep` ranks."""
    moe = arch.ffn.moe
    if moe is None:
        return [0]
    experts = moe.routed_experts
    if ep >= experts:
        options = {ep - experts}
        if moe.shared_experts:
            options.add(max(0, ep - experts - ep // (moe.experts_per_token + 1)))
        return sorted(options)
    per_rank = math.ceil(experts / ep)
    return sorted({per_rank * ep - experts, (per_rank + 1) * ep - experts})


def skeletons(arch: Arch, fabric: FabricSpec, phase: PhaseName, max_devices: int, pins: dict[str, float], fits=None):
    """Yield instance skeletons (batch 1) for a phase, honouring pinned fields.

    Pipeline stages are tried only when pinned or when one stage cannot hold the weights (`fits(skeleton)`
    False): pipelining saves memory but never time in this model.
    """
    dies = fabric.device.dies_per_device
    device_options = [int(pins["devices"])] if "devices" in pins else [d for d in _DEVICE_STEPS if d <= max_devices]
    for devices in device_options:
        ranks = devices * dies
        pp_options = [int(pins["pp"])] if "pp" in pins else [1, 2, 4, 8]
        unfit: list[InstancePlan] = []
        for pp in pp_options:
            if ranks % pp:
                continue
            candidates = list(_stage_skeletons(arch, fabric, phase, devices, pp, pins))
            fitting = [c for c in candidates if fits is None or "pp" in pins or fits(c)]
            if fitting:
                yield from fitting
                break
            unfit = unfit or candidates
        else:
            yield from unfit  # nothing fits: the caller reports why


def _stage_skeletons(arch: Arch, fabric: FabricSpec, phase: PhaseName, devices: int, pp: int, pins: dict[str, float]):
    """Yield the skeletons of one (devices, pp) choice over tp, ep, redundant experts and microbatches."""
    ranks = devices * fabric.device.dies_per_device
    stage_ranks = ranks // pp
    tp_options = [int(pins["tp"])] if "tp" in pins else _divisors_up_to(stage_ranks, 8)
    ep_options = [int(pins["ep"])] if "ep" in pins else [stage_ranks]
    micro_options = [int(pins["microbatches"])] if "microbatches" in pins else [1, 2]
    for tp in tp_options:
        for ep in ep_options:
            redundancy = (
                [int(pins["redundant_experts"])] if "redundant_experts" in pins else _redundancy_options(arch, ep)
            )
            for redundant in redundancy:
                for micro in micro_options:
                    try:
                        skeleton = InstancePlan(
                            devices=devices,
                            tp=tp,
                            pp=pp,
                            ep=ep,
                            batch_per_device=1.0,
                            microbatches=micro,
                            redundant_experts=redundant,
                            instances=int(pins.get("instances", 1)),
                        )
                        expert_layout(arch, skeleton, ranks, 0.0)
                    except ValueError:
                        continue
                    yield skeleton


def best_instance(
    arch: Arch,
    fabric: FabricSpec,
    workload: Workload,
    slo: Slo,
    phase: PhaseName,
    pins: dict[str, float],
    max_devices: int | None = None,
) -> InstanceResult:
    """Return the instance of `phase` with the most tokens/s per device that fits and meets the SLO.

    Raises UserError saying why when no instance qualifies (the memory term and overflow, or the SLO).
    """
    search = PhaseSearch(arch, fabric, workload, slo, phase)
    limit = max_devices or fabric.device_count
    best: InstanceResult | None = None
    closest: InstanceResult | None = None
    fits = lambda skeleton: search.memory(skeleton).fits  # noqa: E731
    for skeleton in skeletons(arch, fabric, phase, limit, pins, fits):
        if "batch_per_device" in pins:
            result = search.evaluate(skeleton.model_copy(update={"batch_per_device": float(pins["batch_per_device"])}))
            if not result.memory.fits:
                closest = closest or result
                continue
        else:
            result = search.largest_batch(skeleton)
            if result is None:
                closest = closest or search.evaluate(skeleton)
                continue
        if best is None or result.tokens_per_s_per_device > best.tokens_per_s_per_device:
            best = result
    if best is None:
        raise UserError(_no_plan_reason(phase, closest, slo, pins))
    best.largest_batch_that_fits = search.largest_fitting_batch(best.instance)
    return best


def _no_plan_reason(phase: PhaseName, closest: InstanceResult | None, slo: Slo, pins: dict[str, float]) -> str:
    if closest is None:
        pinned = ", ".join(f"{phase}.{k}={v:g}" for k, v in pins.items()) or "none"
        return f"no {phase} instance matches the pins ({pinned}): check that ep divides the ranks and the experts"
    if not closest.memory.fits:
        return f"the {phase} plan does not fit: it {closest.memory.why_not()}; use fewer per device or more devices"
    if phase == "decode":
        return f"no decode plan meets TPOT {slo.tpot_ms:g} ms (one sequence per device takes {closest.tpot_ms:.1f} ms)"
    return f"no prefill plan meets TTFT {slo.ttft_ms:g} ms (one prompt per device takes {closest.ttft_ms:.0f} ms)"


def pareto_front(
    arch: Arch, fabric: FabricSpec, workload: Workload, pins: dict[str, float], max_devices: int | None = None
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Return (all decode points, the Pareto front) as (TPOT ms, tokens/s per device), front by rising TPOT."""
    search = PhaseSearch(arch, fabric, workload, Slo(tpot_ms=1e9), "decode")
    points = []
    fits = lambda skeleton: search.memory(skeleton).fits  # noqa: E731
    for skeleton in skeletons(arch, fabric, "decode", max_devices or fabric.device_count, pins, fits):
        for batch in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
            result = search.evaluate(skeleton.model_copy(update={"batch_per_device": float(batch)}))
            if not result.memory.fits:
                break
            points.append((result.tpot_ms, result.tokens_per_s_per_device))
    front: list[tuple[float, float]] = []
    for tpot, rate in sorted(points):
        if not front or rate > front[-1][1]:
            front.append((tpot, rate))
    return points, front


@dataclass
class PlanResult:
    """A whole plan: the best prefill and decode instances, their counts and the end-to-end rates."""

    plan: Plan
    prefill: InstanceResult
    decode: InstanceResult
    output_tokens_per_s_per_device: float

    def to_dict(self, dies: int) -> dict[str, object]:
        """Return the plan as the JSON `matrixstack plan --json` prints."""
        return {
            "prefill_tokens_per_s_per_device": round(self.prefill.tokens_per_s_per_device, 1),
            "decode_tokens_per_s_per_device": round(self.decode.tokens_per_s_per_device, 1),
            "output_tokens_per_s_per_device": round(self.output_tokens_per_s_per_device, 1),
            "tpot_ms": round(self.decode.tpot_ms or 0.0, 2),
            "ttft_ms": round(self.prefill.ttft_ms or 0.0, 1),
            "decode_batch_per_device": self.decode.instance.batch_per_device,
            "devices": self.plan.devices(),
            "plan": {"prefill": self.prefill.to_dict(dies), "decode": self.decode.to_dict(dies)},
        }


def split_devices(
    prefill: InstanceResult, decode: InstanceResult, workload: Workload, devices: int
) -> tuple[int, int, float]:
    """Return (prefill instances, decode instances, output tokens/s per device) that best match rates."""
    p_size, d_size = prefill.instance.devices, decode.instance.devices
    prefill_rps = p_size * prefill.tokens_per_s_per_device / workload.input_len
    decode_rps = d_size * decode.tokens_per_s_per_device / workload.output_len
    best = (0, 0, 0.0)
    for n_decode in range(1, devices // d_size + 1):
        n_prefill = max(1, min((devices - n_decode * d_size) // p_size, math.ceil(n_decode * decode_rps / prefill_rps)))
        used = n_prefill * p_size + n_decode * d_size
        if used > devices:
            continue
        served_rps = min(n_prefill * prefill_rps, n_decode * decode_rps)
        rate = served_rps * workload.output_len / used
        if rate > best[2]:
            best = (n_prefill, n_decode, rate)
    if best[2] == 0.0:
        raise UserError(
            f"{devices} devices cannot hold one prefill instance ({p_size}) and one decode instance ({d_size}); "
            "pin smaller instances or give more --devices"
        )
    return best


def search_plan(
    arch: Arch,
    fabric: FabricSpec,
    workload: Workload,
    slo: Slo,
    devices: int | None = None,
    pins: dict[str, dict[str, float]] | None = None,
) -> PlanResult:
    """Return the plan with the most output tokens/s per device under the SLOs on `devices` of `fabric`."""
    budget = devices or fabric.device_count
    if budget > fabric.device_count:
        raise UserError(f"--devices {budget} exceeds the {fabric.device_count} devices of fabric {fabric.name!r}")
    pins = pins or {}
    prefill = best_instance(arch, fabric, workload, slo, "prefill", pins.get("prefill", {}), budget)
    decode = best_instance(arch, fabric, workload, slo, "decode", pins.get("decode", {}), budget)
    n_prefill, n_decode, rate = split_devices(prefill, decode, workload, budget)
    n_prefill = int(pins.get("prefill", {}).get("instances", n_prefill))
    n_decode = int(pins.get("decode", {}).get("instances", n_decode))
    prefill.instance = prefill.instance.model_copy(update={"instances": n_prefill})
    decode.instance = decode.instance.model_copy(update={"instances": n_decode})
    return PlanResult(Plan(prefill=prefill.instance, decode=decode.instance), prefill, decode, rate)
