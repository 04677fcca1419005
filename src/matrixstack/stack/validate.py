"""Checking a shape against the catalogs and perf: every deployment's arch, fabric, slice, weights and plan.

`Shape` (stack.spec) checks the file on its own; `check_shape` checks what needs the built-in catalogs and the
perf model, without a database: the fabric loads (a name, `local` = this machine, a path, or inline), each
deployment's arch loads, its slice fits the fabric (and the pool's fabrics hold every slice asked of them),
packaged weights exist for its arch when it asks for them (or it is a registered model, `matrixstack model
add`, whose folder the builtin engine can run when the deployment asks for it), a vllm deployment has a model
vLLM can load (`stack.vllm_launch.check_vllm_model`: a registered model or packaged weights to export, never
`weights: random`), and it has a plan: the one given, or one perf finds on the slice's devices. The builtin
engine runs prefill and decode in one instance, so its auto plan is perf's best decode instance
(`best_instance`) within the slice; a vllm deployment gets a disaggregated plan (`search_plan`) on the slice's
devices. A weights folder is not looked for here: it lives at the site
(`matrixstack up` looks for a vllm deployment's folder on a local site before it applies the shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matrixstack.arch.loader import load_arch
from matrixstack.arch.registry import registered_model
from matrixstack.arch.spec import Arch
from matrixstack.engine import PACKAGED_WEIGHTS, weights_or_packaged
from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.fabric.spec import FabricSpec
from matrixstack.perf.search import PIN_FIELDS, PhaseSearch, best_instance, search_plan
from matrixstack.perf.spec import InstancePlan, Plan
from matrixstack.stack.spec import WEIGHTS_PACKAGED, DeploymentShape, Shape
from matrixstack.stack.vllm_launch import check_vllm_model


@dataclass(frozen=True)
class PlannedDeployment:
    """A deployment with its plan: engine workers (the plan's EP degree) and perf's prediction for it."""

    name: str
    plan: InstancePlan | Plan
    workers: int
    # perf's prediction: tokens_per_s_per_device (decode, per device of the decode instance), tpot_ms, ttft_ms,
    # devices (that the plan uses), and for a prefill/decode plan output_tokens_per_s_per_device (end to end,
    # over all its devices)
    predicted: dict[str, Any]
    slice_devices: int = 0  # devices the deployment's slice asks for
    auto: bool = field(default=False)  # the plan was found by perf (plan: auto)

    def summary(self) -> str:
        """Return the plan in a few words, e.g. "EP2 on 2 devices" or "prefill 6x16 EP32, decode 1x160 EP320"."""
        if isinstance(self.plan, InstancePlan):
            p = self.plan
            tp = f" TP{p.tp}" if p.tp > 1 else ""
            pp = f" PP{p.pp}" if p.pp > 1 else ""
            times = f"{p.instances} x " if p.instances > 1 else ""
            return f"EP{p.ep}{tp}{pp} on {times}{p.devices} device{'s' if p.devices > 1 else ''}"
        pre, dec = self.plan.prefill, self.plan.decode
        return (
            f"prefill {pre.instances}x{pre.devices} EP{pre.ep}, decode {dec.instances}x{dec.devices} EP{dec.ep} "
            f"on {self.plan.devices()} devices"
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the planned deployment as JSON-ready data."""
        return {
            "name": self.name,
            "plan": self.plan.model_dump(mode="json"),
            "plan_summary": self.summary(),
            "auto": self.auto,
            "workers": self.workers,
            "slice_devices": self.slice_devices,
            "predicted": self.predicted,
        }


def shape_fabric(shape: Shape) -> FabricSpec:
    """Return the shape's fabric: inline, or loaded by name (`local` = this machine) or path; UserError otherwise."""
    if isinstance(shape.fabric, FabricSpec):
        return shape.fabric
    try:
        return load_fabric(shape.fabric)
    except UserError as exc:
        raise UserError(f"fabric: {exc}") from None


def check_shape(shape: Shape) -> list[PlannedDeployment]:
    """Return each deployment of `shape` with its plan, in the shape's order (see the module docstring).

    Raises UserError naming the deployment and the fix when its arch, fabric, slice, weights or plan fails.
    """
    fabric = shape_fabric(shape)
    planned = [_plan_deployment(d, fabric) for d in shape.deployments]
    _check_pool_sizes(shape, fabric)
    return planned


def _check_pool_sizes(shape: Shape, fabric: FabricSpec) -> None:
    """Raise UserError when the slices asked of a pool add up to more devices than its fabrics hold."""
    dies = fabric.device.dies_per_device
    for pool in shape.pools:
        asked = [d for d in shape.deployments if d.pool == pool.name]
        total = sum(d.slice.device_count(dies) for d in asked)
        held = pool.fabrics * fabric.device_count
        if total > held:
            names = ", ".join(d.name for d in asked)
            raise UserError(
                f"pool {pool.name}: its deployments ({names}) ask for {total} devices but its {pool.fabrics} "
                f"fabric(s) {fabric.name} hold {held}; ask for smaller slices or set fabrics: on the pool"
            )


def _plan_deployment(d: DeploymentShape, fabric: FabricSpec) -> PlannedDeployment:
    """Return one deployment's plan after checking its arch, slice and weights."""
    try:
        arch = load_arch(d.arch)
    except UserError as exc:
        raise UserError(f"deployment {d.name}: arch: {exc}") from None
    devices = d.slice.device_count(fabric.device.dies_per_device)
    if devices > fabric.device_count:
        raise UserError(
            f"deployment {d.name}: its slice asks for {devices} devices but fabric {fabric.name} has "
            f"{fabric.device_count}; ask for at most {fabric.device_count} or use a larger fabric"
        )
    if d.slice.constraints.within_domain and devices > fabric.scale_up_domain_size:
        raise UserError(
            f"deployment {d.name}: its slice of {devices} devices does not fit one scale-up domain of fabric "
            f"{fabric.name} ({fabric.scale_up_domain_size} devices); ask for fewer devices or set "
            "slice.constraints.within_domain: false"
        )
    if d.engine == "vllm":
        check_vllm_model(d.name, d.arch, d.weights)
    elif d.weights == WEIGHTS_PACKAGED:
        _check_own_weights(d, arch)
    pins = _pins(d)
    try:
        if d.plan == "auto":
            plan, predicted = _auto_plan(d, arch, fabric, devices, pins)
        else:
            plan, predicted = _given_plan(d, arch, fabric, devices)
    except UserError as exc:
        raise UserError(
            f"deployment {d.name}: no plan on its slice of {devices} devices of {fabric.name}: {exc}; relax its "
            "slo, change its pins or workload, or ask for a larger slice"
        ) from None
    workers = plan.ep if isinstance(plan, InstancePlan) else plan.decode.ep
    return PlannedDeployment(d.name, plan, workers, predicted, devices, d.plan == "auto")


def _check_own_weights(d: DeploymentShape, arch: Arch) -> None:
    """Raise UserError when a deployment asking for its arch's own weights has none: neither packaged nor a
    registered model's folder, or a registered model the builtin engine cannot run on a builtin-engine deployment."""
    model = registered_model(arch.name)
    if model is None and arch.name not in PACKAGED_WEIGHTS:
        shipped = ", ".join(sorted(PACKAGED_WEIGHTS))
        raise UserError(
            f"deployment {d.name}: weights: packaged weights exist only for {shipped}, not {arch.name}; give "
            "weights: FOLDER (its safetensors and tokenizer) or weights: random for a smoke test"
        )
    if model is not None and d.engine == "matrixstack":
        try:
            weights_or_packaged(arch.name, None, "")
        except UserError as exc:
            raise UserError(f"deployment {d.name}: {exc}") from None


def _pins(d: DeploymentShape) -> dict[str, dict[str, float]]:
    """Return the deployment's pins as {phase: {field: value}}; UserError naming an unknown field."""
    out: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    for pin, value in d.pins.items():
        phase, _, name = pin.partition(".")
        if name not in PIN_FIELDS:
            raise UserError(f"deployment {d.name}: pins: {pin!r}: {name!r} is not one of {', '.join(PIN_FIELDS)}")
        if value <= 0:
            raise UserError(f"deployment {d.name}: pins: {pin} must be positive, got {value:g}")
        out[phase][name] = float(value)
    return out


def _auto_plan(
    d: DeploymentShape, arch: Arch, fabric: FabricSpec, devices: int, pins: dict[str, dict[str, float]]
) -> tuple[InstancePlan | Plan, dict[str, Any]]:
    """Return perf's plan for the deployment on `devices` and its prediction."""
    if d.engine == "matrixstack":
        best = best_instance(arch, fabric, d.workload, d.slo, "decode", pins["decode"], devices)
        return best.instance, _colocated_prediction(d, arch, fabric, best.instance, best.tokens_per_s_per_device)
    found = search_plan(arch, fabric, d.workload, d.slo, devices=devices, pins=pins)
    predicted = {
        "tokens_per_s_per_device": round(found.decode.tokens_per_s_per_device, 1),
        "output_tokens_per_s_per_device": round(found.output_tokens_per_s_per_device, 1),
        "tpot_ms": round(found.decode.tpot_ms or 0.0, 2),
        "ttft_ms": round(found.prefill.ttft_ms or 0.0, 1),
        "devices": found.plan.devices(),
    }
    return found.plan, predicted


def _colocated_prediction(
    d: DeploymentShape, arch: Arch, fabric: FabricSpec, instance: InstancePlan, decode_rate: float
) -> dict[str, Any]:
    """Return the prediction of one colocated instance: its decode rate and TPOT at its batch, and the TTFT of one
    prompt per device prefilled on the same devices (no KV hand-off: prefill and decode share the instance)."""
    decode = PhaseSearch(arch, fabric, d.workload, d.slo, "decode").evaluate(instance)
    prefill_search = PhaseSearch(arch, fabric, d.workload, d.slo, "prefill")
    one_prompt = instance.model_copy(update={"batch_per_device": float(d.workload.input_len)})
    prefill = prefill_search.evaluate(one_prompt)
    return {
        "tokens_per_s_per_device": round(decode_rate, 1),
        "tpot_ms": round(decode.tpot_ms or 0.0, 2),
        "ttft_ms": round((prefill.ttft_ms or 0.0) - prefill_search.kv_transfer_ms, 1),
        "devices": instance.devices * instance.instances,
    }


def _given_plan(
    d: DeploymentShape, arch: Arch, fabric: FabricSpec, devices: int
) -> tuple[InstancePlan | Plan, dict[str, Any]]:
    """Return the deployment's own plan and perf's prediction for it; UserError when it needs more devices than
    the slice has or does not fit in device memory."""
    plan = d.plan
    assert not isinstance(plan, str)
    used = plan.devices * plan.instances if isinstance(plan, InstancePlan) else plan.devices()
    if used > devices:
        raise UserError(f"the plan uses {used} devices but the slice has {devices}")
    if isinstance(plan, InstancePlan):
        decode = PhaseSearch(arch, fabric, d.workload, d.slo, "decode").evaluate(plan)
        if not decode.memory.fits:
            raise UserError(f"the plan does not fit: it {decode.memory.why_not()}")
        return plan, _colocated_prediction(d, arch, fabric, plan, decode.tokens_per_s_per_device)
    prefill = PhaseSearch(arch, fabric, d.workload, d.slo, "prefill").evaluate(plan.prefill)
    decode = PhaseSearch(arch, fabric, d.workload, d.slo, "decode").evaluate(plan.decode)
    for phase, result in (("prefill", prefill), ("decode", decode)):
        if not result.memory.fits:
            raise UserError(f"the plan's {phase} instance does not fit: it {result.memory.why_not()}")
    prefill_rps = plan.prefill.devices * prefill.tokens_per_s_per_device / d.workload.input_len
    decode_rps = plan.decode.devices * decode.tokens_per_s_per_device / d.workload.output_len
    served_rps = min(plan.prefill.instances * prefill_rps, plan.decode.instances * decode_rps)
    predicted = {
        "tokens_per_s_per_device": round(decode.tokens_per_s_per_device, 1),
        "output_tokens_per_s_per_device": round(served_rps * d.workload.output_len / used, 1),
        "tpot_ms": round(decode.tpot_ms or 0.0, 2),
        "ttft_ms": round(prefill.ttft_ms or 0.0, 1),
        "devices": used,
    }
    return plan, predicted
