"""`matrixstack plan | compare | validate`: what a model does on a slice, and how well the model predicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table

from matrixstack.arch.loader import load_arch
from matrixstack.arch.spec import Arch
from matrixstack.cli.common import console, print_json, user_errors_exit_2
from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.fabric.spec import FabricSpec
from matrixstack.perf.search import (
    DEFAULT_EXPERT_SKEW,
    DEFAULT_SEQUENCE_EXPERT_CV,
    PIN_FIELDS,
    PlanResult,
    pareto_front,
    search_plan,
)
from matrixstack.perf.spec import Precision, Slo, Workload


@dataclass
class PlanOptions:
    """The options `plan` and `compare` share."""

    devices: int | None
    workload: Workload
    slo: Slo
    pins: dict[str, dict[str, float]]


def parse_pins(pins: list[str]) -> dict[str, dict[str, float]]:
    """Return `phase.field=value` pins as {phase: {field: value}}; UserError naming a bad one."""
    parsed: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    for pin in pins:
        key, sep, value = pin.partition("=")
        phase, dot, field = key.partition(".")
        if phase == "prefill" and field == "tokens_per_device":
            field = "batch_per_device"  # a prefill batch is counted in tokens
        if not sep or not dot or phase not in parsed or field not in PIN_FIELDS:
            raise UserError(
                f"cannot read --pin {pin!r}; use PHASE.FIELD=VALUE with PHASE prefill or decode and FIELD one of "
                + ", ".join(PIN_FIELDS)
                + " (prefill.tokens_per_device is prefill.batch_per_device)"
            )
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--pin {pin!r}: {value!r} is not a number") from None
        if number <= 0:
            raise UserError(f"--pin {pin!r}: the value must be positive")
        parsed[phase][field] = number
    return parsed


def _options(
    devices: int | None,
    precision: str,
    input_len: int,
    output_len: int,
    tpot_ms: float,
    ttft_ms: float,
    mtp_acceptance: float,
    perfect_eplb: bool,
    pins: list[str],
) -> PlanOptions:
    if precision not in ("fp32", "bf16", "fp8", "int8"):
        raise UserError(f"--precision {precision!r} is not one of fp32, bf16, fp8, int8")
    if devices is not None and devices < 1:
        raise UserError("--devices must be at least 1")
    for name, value in (("--input-len", input_len), ("--output-len", output_len)):
        if value < 1:
            raise UserError(f"{name} must be at least 1")
    if not 0 <= mtp_acceptance <= 1:
        raise UserError("--mtp-acceptance is a probability between 0 and 1")
    if tpot_ms <= 0 or ttft_ms <= 0:
        raise UserError("--tpot-ms and --ttft-ms must be positive")
    precision_value: Precision = precision  # type: ignore[assignment]
    workload = Workload(
        input_len=input_len,
        output_len=output_len,
        precision=precision_value,
        mtp_acceptance=mtp_acceptance,
        expert_skew=0.0 if perfect_eplb else DEFAULT_EXPERT_SKEW,
        sequence_expert_cv=0.0 if perfect_eplb else DEFAULT_SEQUENCE_EXPERT_CV,
    )
    return PlanOptions(devices, workload, Slo(tpot_ms=tpot_ms, ttft_ms=ttft_ms), parse_pins(pins))


DEVICES = typer.Option(None, "--devices", help="Devices of the fabric to plan on (default: all).")
PRECISION = typer.Option("int8", "--precision", help="Linear layers in int8, fp8, bf16 or fp32.")
INPUT_LEN = typer.Option(4096, "--input-len", help="Prompt tokens per request.")
OUTPUT_LEN = typer.Option(256, "--output-len", help="Generated tokens per request.")
TPOT = typer.Option(50.0, "--tpot-ms", help="Time-per-output-token target (ms).")
TTFT = typer.Option(2000.0, "--ttft-ms", help="Time-to-first-token target (ms).")
MTP = typer.Option(0.0, "--mtp-acceptance", help="Acceptance of one MTP draft token (0 turns MTP off).")
PERFECT = typer.Option(False, "--perfect-eplb", help="Assume perfectly balanced experts (skew 0).")
PIN = typer.Option([], "--pin", help="Fix a plan field, e.g. decode.ep=320 (repeatable).")
JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _instance_table(result: PlanResult, dies: int) -> Table:
    data = result.to_dict(dies)["plan"]
    table = Table(title="plan")
    for column in ("phase", "instances", "devices", "tp", "dp", "ep", "pp", "batch", "micro", "redundant", "tok/s/dev"):
        table.add_column(column, justify="right")
    for phase in ("prefill", "decode"):
        inst = data[phase]
        batch = f"{inst['batch']:g} {'tokens' if phase == 'prefill' else 'seqs'}"
        table.add_row(
            phase,
            str(inst["instances"]),
            str(inst["devices"]),
            str(inst["tp"]),
            str(inst["dp"]),
            str(inst["ep"]),
            str(inst["pp"]),
            batch,
            str(inst["microbatches"]),
            str(inst["redundant_experts"]),
            f"{inst['tokens_per_s_per_device']:,.0f}",
        )
    return table


def _terms_table(result: PlanResult, dies: int) -> Table:
    data = result.to_dict(dies)["plan"]
    table = Table(title="where the time goes (ms per step or batch, per rank) and memory (GiB per rank)")
    table.add_column("term")
    table.add_column("prefill", justify="right")
    table.add_column("decode", justify="right")
    terms = list(dict.fromkeys([*data["prefill"]["step_terms_ms"], *data["decode"]["step_terms_ms"]]))
    for term in terms:
        table.add_row(
            term,
            f"{data['prefill']['step_terms_ms'].get(term, 0.0):.2f}",
            f"{data['decode']['step_terms_ms'].get(term, 0.0):.2f}",
        )
    table.add_row("[bold]step[/]", f"{data['prefill']['step_ms']:.2f}", f"{data['decode']['step_ms']:.2f}")
    for key in ("weights", "kv_cache", "activations", "comm_buffers", "total", "capacity"):
        table.add_row(
            f"memory {key}",
            f"{data['prefill']['memory_gib_per_rank'][key]:g}",
            f"{data['decode']['memory_gib_per_rank'][key]:g}",
        )
    return table


def _summary_line(arch: Arch, fabric: FabricSpec, result: PlanResult) -> str:
    return (
        f"[bold]{arch.name}[/] on [bold]{fabric.name}[/] ({result.plan.devices()} devices): "
        f"decode {result.decode.tokens_per_s_per_device:,.0f} tok/s/device at TPOT {result.decode.tpot_ms:.1f} ms, "
        f"prefill {result.prefill.tokens_per_s_per_device:,.0f} tok/s/device at TTFT {result.prefill.ttft_ms:.0f} ms, "
        f"end to end {result.output_tokens_per_s_per_device:,.0f} output tok/s/device"
    )


def _plan_one(arch: Arch, fabric: FabricSpec, options: PlanOptions) -> PlanResult:
    return search_plan(arch, fabric, options.workload, options.slo, options.devices, options.pins)


def _pareto_series(arch: Arch, fabric: FabricSpec, options: PlanOptions, result: PlanResult):
    points, front = pareto_front(arch, fabric, options.workload, options.pins["decode"], options.devices)
    chosen = (result.decode.tpot_ms or 0.0, result.decode.tokens_per_s_per_device)
    return (fabric.name, points, front, chosen)


def plan(
    arch_name: str = typer.Argument(..., metavar="ARCH", help="A built-in arch name or an arch YAML path."),
    fabric_name: str = typer.Option(..., "--fabric", help="A built-in fabric name, `local`, or a fabric YAML."),
    devices: int | None = DEVICES,
    precision: str = PRECISION,
    input_len: int = INPUT_LEN,
    output_len: int = OUTPUT_LEN,
    tpot_ms: float = TPOT,
    ttft_ms: float = TTFT,
    mtp_acceptance: float = MTP,
    perfect_eplb: bool = PERFECT,
    pin: list[str] = PIN,
    as_json: bool = JSON,
    png: Path | None = typer.Option(None, "--png", help="Draw the decode Pareto front to this PNG."),
) -> None:
    """Find the plan with the most tokens/s per device under the TPOT and TTFT targets."""
    options = _options(devices, precision, input_len, output_len, tpot_ms, ttft_ms, mtp_acceptance, perfect_eplb, pin)
    arch, fabric = load_arch(arch_name), load_fabric(fabric_name)
    result = _plan_one(arch, fabric, options)
    dies = fabric.device.dies_per_device
    if png is not None:
        from matrixstack.tools.draw.perf import draw_pareto

        title = f"{arch.name} decode on {fabric.name}, {precision}"
        draw_pareto(title, [_pareto_series(arch, fabric, options, result)], tpot_ms, png)
    if as_json:
        print_json({"arch": arch.name, "fabric": fabric.name, **result.to_dict(dies)})
        return
    console.print(_summary_line(arch, fabric, result))
    console.print(_instance_table(result, dies))
    console.print(_terms_table(result, dies))
    if png is not None:
        console.print(f"Pareto front drawn to {png}")


def compare(
    arch_name: str = typer.Argument(..., metavar="ARCH", help="A built-in arch name or an arch YAML path."),
    fabrics: str = typer.Option(..., "--fabrics", help="Two fabrics, comma-separated: A,B."),
    devices: int | None = DEVICES,
    precision: str = PRECISION,
    input_len: int = INPUT_LEN,
    output_len: int = OUTPUT_LEN,
    tpot_ms: float = TPOT,
    ttft_ms: float = TTFT,
    mtp_acceptance: float = MTP,
    perfect_eplb: bool = PERFECT,
    pin: list[str] = PIN,
    as_json: bool = JSON,
    png: Path | None = typer.Option(None, "--png", help="Draw both decode Pareto fronts to this PNG."),
) -> None:
    """Plan the same model on two fabrics and print them side by side with the ratio of decode tokens/s/device."""
    names = [name.strip() for name in fabrics.split(",") if name.strip()]
    if len(names) != 2:
        raise UserError(
            f"--fabrics takes two fabrics separated by a comma, e.g. cloudmatrix384,ascend910c-8x-roce; got {fabrics!r}"
        )
    options = _options(devices, precision, input_len, output_len, tpot_ms, ttft_ms, mtp_acceptance, perfect_eplb, pin)
    arch = load_arch(arch_name)
    loaded = [load_fabric(name) for name in names]
    results = [_plan_one(arch, fabric, options) for fabric in loaded]
    ratio = results[0].decode.tokens_per_s_per_device / results[1].decode.tokens_per_s_per_device
    if png is not None:
        from matrixstack.tools.draw.perf import draw_pareto

        series = [_pareto_series(arch, f, options, r) for f, r in zip(loaded, results, strict=True)]
        draw_pareto(f"{arch.name} decode, {precision}: {names[0]} vs {names[1]}", series, tpot_ms, png)
    if as_json:
        print_json(
            {
                "arch": arch.name,
                "fabrics": names,
                "results": {f.name: r.to_dict(f.device.dies_per_device) for f, r in zip(loaded, results, strict=True)},
                "ratio": round(ratio, 3),
            }
        )
        return
    table = Table(title=f"{arch.name}: {names[0]} vs {names[1]} ({precision}, TPOT <= {tpot_ms:g} ms)")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("ratio", justify="right")
    rows = [
        ("decode tok/s/device", lambda r: r.decode.tokens_per_s_per_device, "{:,.0f}"),
        ("TPOT ms", lambda r: r.decode.tpot_ms, "{:.1f}"),
        ("decode batch/device", lambda r: r.decode.instance.batch_per_device, "{:g}"),
        ("decode instance (devices x count)", None, ""),
        ("decode EP / TP", None, ""),
        ("prefill tok/s/device", lambda r: r.prefill.tokens_per_s_per_device, "{:,.0f}"),
        ("end-to-end output tok/s/device", lambda r: r.output_tokens_per_s_per_device, "{:,.0f}"),
    ]
    for label, get, fmt in rows:
        if label.startswith("decode instance"):
            values = [f"{r.decode.instance.devices} x {r.decode.instance.instances}" for r in results]
            table.add_row(label, *values, "")
            continue
        if label.startswith("decode EP"):
            table.add_row(label, *[f"{r.decode.instance.ep} / {r.decode.instance.tp}" for r in results], "")
            continue
        assert get is not None
        a, b = get(results[0]) or 0.0, get(results[1]) or 0.0
        table.add_row(label, fmt.format(a), fmt.format(b), f"{a / b:.2f}x" if b else "")
    console.print(table)
    console.print(f"decode tokens/s per device ratio {names[0]}/{names[1]}: [bold]{ratio:.2f}x[/]")


def validate(as_json: bool = JSON) -> None:
    """Predict every published result (layout pinned) and print published vs predicted and the signed error."""
    from matrixstack.perf.validation import validate as run_validation

    rows, median = run_validation()
    worst = max(abs(r.error) for r in rows if r.in_target)
    if as_json:
        print_json(
            {
                "rows": [
                    {
                        "id": r.id,
                        "kind": r.kind,
                        "phase": r.phase,
                        "fabric": r.fabric,
                        "published": r.published,
                        "predicted": round(r.predicted, 1),
                        "error": round(r.error, 4),
                        "in_target": r.in_target,
                    }
                    for r in rows
                ],
                "median_abs_error": round(median, 4),
                "max_abs_error_in_target": round(worst, 4),
            }
        )
        return
    table = Table(title="published vs predicted tokens/s per device (shared/data/published_results.csv)")
    for column in ("id", "kind", "phase", "published", "predicted", "error"):
        table.add_column(column, justify="right" if column in ("published", "predicted", "error") else "left")
    for r in rows:
        style = "" if r.in_target else "dim"
        table.add_row(
            r.id, r.kind, r.phase, f"{r.published:,.0f}", f"{r.predicted:,.0f}", f"{r.error:+.1%}", style=style
        )
    console.print(table)
    console.print(
        f"measured + profiled rows: median |error| [bold]{median:.1%}[/], worst {worst:.1%} (targets 15% and 30%)"
    )


def register(app: typer.Typer) -> None:
    """Add `plan`, `compare` and `validate` to the top-level app."""
    app.command("plan")(user_errors_exit_2(plan))
    app.command("compare")(user_errors_exit_2(compare))
    app.command("validate")(user_errors_exit_2(validate))
