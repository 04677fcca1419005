"""`matrixstack fabric ...`: list, show and draw fabrics; predict collective costs on a group of ranks."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.table import Table

from matrixstack.cli.common import console, print_json, user_errors_exit_2
from matrixstack.errors import UserError
from matrixstack.fabric import collectives
from matrixstack.fabric.group import DeviceGroup
from matrixstack.fabric.loader import fabric_names, load_fabric
from matrixstack.fabric.spec import FabricSpec
from matrixstack.units import format_bytes, parse_bytes

fabric_app = typer.Typer(help="Fabrics: topology as data (devices, hosts, planes, switch tiers).", no_args_is_help=True)


class Op(StrEnum):
    """Operations `fabric cost` predicts."""

    p2p = "p2p"
    all_reduce = "all-reduce"
    all_gather = "all-gather"
    reduce_scatter = "reduce-scatter"
    all_to_all = "all-to-all"


class PlaneChoice(StrEnum):
    """A plane kind to force, for libraries that use one plane only (DeepEP low-latency: scale_out)."""

    scale_up = "scale_up"
    scale_out = "scale_out"


def _fabric_table(fabric: FabricSpec) -> Table:
    s = fabric.summary()
    table = Table(title=f"fabric {fabric.name}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    dev = fabric.device
    table.add_row("description", fabric.description)
    table.add_row("nodes", str(fabric.node_count))
    table.add_row("devices", f"{s['device_count']} x {dev.kind} ({dev.devices_per_node} per node)")
    table.add_row("dies (ranks)", f"{s['die_count']} ({dev.dies_per_device} per device)")
    peaks = ", ".join(f"{k} {v:g}" for k, v in dev.peak_tflops.items())
    table.add_row("peak dense TFLOPS / device", peaks)
    table.add_row("HBM / device", f"{dev.hbm_gib:g} GiB at {dev.hbm_gbs:g} GB/s")
    table.add_row("HBM total", f"{s['hbm_gib_total']:g} GiB")
    host = fabric.host
    table.add_row(
        "host CPUs", f"{s['cpu_count']} x {host.cpu_kind} ({host.cpus_per_node}/node, {host.cores_per_cpu} cores)"
    )
    table.add_row("host DRAM / node", f"{host.dram_gib:g} GiB")
    table.add_row("scale-up domain", f"{s['scale_up_domain_size']} devices")
    for plane in fabric.planes:
        tiers = " -> ".join(
            f"{t.name} ({min(t.nodes_per_domain, fabric.node_count)} node(s), {t.switches_per_domain} sw, "
            f"+{t.latency_us:g} us{'' if t.oversubscription == 1 else f', {t.oversubscription:g}:1'})"
            for t in plane.tiers
        )
        per = "device" if plane.attached == "device" else "node"
        table.add_row(
            f"plane {plane.name}",
            f"{plane.kind}, {plane.protocol}, {plane.bandwidth_gbs:g} GB/s per {per} (uni), "
            f"{plane.efficiency:.0%} achievable; tiers {tiers}",
        )
    return table


@fabric_app.command("list")
@user_errors_exit_2
def list_fabrics(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the built-in fabrics."""
    summaries = [load_fabric(name).summary() for name in fabric_names()]
    if as_json:
        print_json(summaries)
        return
    table = Table(title="built-in fabrics")
    table.add_column("name", no_wrap=True)
    for column in ("device", "nodes", "devices", "dies", "CPUs", "scale-up domain", "HBM GiB"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            str(s["name"]),
            str(s["device_kind"]),
            str(s["node_count"]),
            str(s["device_count"]),
            str(s["die_count"]),
            str(s["cpu_count"]),
            str(s["scale_up_domain_size"]),
            f"{s['hbm_gib_total']:g}",
        )
    console.print(table)


@fabric_app.command("show")
@user_errors_exit_2
def show_fabric(
    name: str = typer.Argument(..., help="A built-in fabric name, `local`, or a path to a fabric YAML."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    png: Path | None = typer.Option(None, "--png", help="Also draw the topology to this PNG file."),
) -> None:
    """Show one fabric: devices, hosts, planes and switch tiers."""
    fabric = load_fabric(name)
    if png is not None:
        from matrixstack.tools.draw.fabric import draw_fabric

        draw_fabric(fabric, png)
    if as_json:
        print_json(fabric.summary())
        return
    console.print(_fabric_table(fabric))
    if png is not None:
        console.print(f"topology drawn to {png}")


@fabric_app.command("cost")
@user_errors_exit_2
def cost(
    name: str = typer.Argument(..., help="A built-in fabric name, `local`, or a path to a fabric YAML."),
    op: Op = typer.Option(Op.all_to_all, "--op", help="The operation to predict."),
    ranks: int = typer.Option(8, "--ranks", help="Group size in ranks (dies where devices expose them)."),
    start: int = typer.Option(0, "--start", help="First rank of the group (ranks are packed node by node)."),
    size: str = typer.Option("1MiB", "--size", help="Message size: per-rank buffer (see `fabric cost --help`)."),
    plane: PlaneChoice | None = typer.Option(None, "--plane", help="Force one plane kind for every pair."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Predict the time of an operation on a group of ranks, and the planes its traffic uses.

    Sizes: all-reduce = buffer per rank; all-gather = gathered output per rank; reduce-scatter = input per rank;
    all-to-all = bytes each rank sends in total; p2p = bytes from the first to the last rank of the group.
    """
    fabric = load_fabric(name)
    if ranks < 1:
        raise UserError("--ranks must be at least 1")
    group = DeviceGroup.first(fabric, ranks, start)
    size_bytes = parse_bytes(size)
    plane_kind = plane.value if plane else None
    if op is Op.p2p:
        result = collectives.p2p(fabric, group.ranks[0], group.ranks[-1], size_bytes, plane_kind)
    else:
        function = {
            Op.all_reduce: collectives.all_reduce,
            Op.all_gather: collectives.all_gather,
            Op.reduce_scatter: collectives.reduce_scatter,
            Op.all_to_all: collectives.all_to_all,
        }[op]
        result = function(group, size_bytes, plane_kind)
    routing = collectives.group_planes(group)
    if as_json:
        print_json({"fabric": fabric.name, "group": routing, **result.to_dict()})
        return
    console.print(
        f"[bold]{op.value}[/] of {format_bytes(size_bytes)} on {ranks} ranks of {fabric.name} "
        f"({routing['nodes']} node(s); tiers {', '.join(routing['tiers']) or 'none'}): "
        f"[bold]{result.time_us:.1f} us[/] ({result.algorithm})"
    )
    table = Table()
    for column in ("phase", "ports", "ranks", "latency us", "GB/s per rank", "time us"):
        table.add_column(column)
    for phase in result.phases:
        table.add_row(
            phase.name,
            ", ".join(phase.ports),
            str(phase.ranks),
            f"{phase.latency_us:.2f}",
            f"{phase.bandwidth_gbs:.1f}",
            f"{phase.time_us:.1f}",
        )
    console.print(table)


@fabric_app.command("validate")
@user_errors_exit_2
def validate(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    png: Path | None = typer.Option(None, "--png", help="Draw published vs predicted latency to this PNG."),
) -> None:
    """Compare predicted MoE dispatch/combine times with the published microbenchmarks (CM-v2 Table 7)."""
    from matrixstack.fabric.ep_validation import compare

    rows = compare()
    worst = max(abs(r.error) for r in rows)
    if png is not None:
        from matrixstack.tools.draw.fabric import draw_comparison

        draw_comparison(rows, png)
    if as_json:
        print_json(
            {
                "rows": [
                    {
                        "library": r.library,
                        "op": r.op,
                        "ep": r.ep,
                        "published_us": r.published_us,
                        "predicted_us": round(r.predicted_us, 2),
                        "error": round(r.error, 4),
                    }
                    for r in rows
                ],
                "max_abs_error": round(worst, 4),
            }
        )
        return
    table = Table(title="MoE dispatch/combine, 128 tokens per rank (CM-v2 Table 7)")
    for column in ("library", "op", "EP", "published us", "predicted us", "error"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.library, r.op, str(r.ep), f"{r.published_us:g}", f"{r.predicted_us:.0f}", f"{r.error:+.1%}")
    console.print(table)
    console.print(f"largest error: {worst:.1%}")
