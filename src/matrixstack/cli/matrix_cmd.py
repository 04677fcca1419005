"""`matrixstack matrix ...`: pools and slices in a database, failures and repair, and the fleet simulation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from matrixstack.cli.common import console, print_json, user_errors_exit_2
from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.spec import POLICIES, POLICY_HELP, SliceConstraints, SliceRequest

if TYPE_CHECKING:  # the services pull in SQLAlchemy: import them only when a matrix command runs
    from matrixstack.matrix.database import Database
    from matrixstack.matrix.slices import SliceInfo

matrix_app = typer.Typer(
    help="Matrix-level supply: pools over fabrics, slices of any devices of a scale-up domain, failures, "
    "and the fleet simulation.",
    no_args_is_help=True,
)

DB_HELP = "Database URL (sqlite:///FILE or postgresql+psycopg://USER@HOST:PORT/DB); default: the data directory's file."
POOL_HELP = "Pool name."
POLICY_TEXT = "; ".join(f"{name}: {text}" for name, text in POLICY_HELP.items())

DbOption = typer.Option(None, "--db", envvar="MATRIXSTACK_DB", help=DB_HELP)
PoolOption = typer.Option("default", "--pool", help=POOL_HELP)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of text.")


def ranges(values: list[int] | tuple[int, ...]) -> str:
    """Return sorted integers as compact ranges, e.g. [0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    items = sorted(values)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def _database(db: str | None) -> Database:
    from matrixstack.matrix.database import open_database

    return open_database(db)


def _parse_device(text: str) -> tuple[int, int]:
    from matrixstack.matrix.failures import parse_device

    return parse_device(text)


def _slice_line(s: SliceInfo, verb: str) -> str:
    state = "" if s.state == "active" else f" [{s.state}]"
    hosts = f", {s.host_cpus} host CPUs" if s.host_cpus else ""
    hosts += f", {s.dram_gib:g} GiB DRAM" if s.dram_gib else ""
    dies = f" ({len(s.devices) * s.dies_per_device} dies)" if s.dies_per_device > 1 else ""
    return (
        f"{verb} slice [bold]{s.id}[/] for {s.tenant}{state}: {len(s.devices)} devices{dies} "
        f"[{ranges(s.devices)}] on node(s) {ranges(s.nodes)} of fabric {s.fabric_index} ({s.fabric}), "
        f"tier {s.tier or '-'}, policy {s.policy}{hosts}"
    )


def _print_slice(s: SliceInfo, verb: str, as_json: bool) -> None:
    """Print a slice a command changed: as JSON, or as one line saying what was done."""
    if as_json:
        print_json(s.to_dict())
        return
    console.print(_slice_line(s, verb), highlight=False)


@matrix_app.command("create")
@user_errors_exit_2
def create(
    fabric: list[str] = typer.Option(..., "--fabric", help="Fabric name or YAML path; repeat for several."),
    count: int = typer.Option(1, "--count", help="Copies of each fabric in the pool (a fleet)."),
    pool: str = PoolOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a pool over one or more fabrics."""
    if count < 1:
        raise UserError("--count must be at least 1")
    specs = [load_fabric(name) for name in fabric for _ in range(count)]
    from matrixstack.matrix.pools import create_pool

    with _database(db) as database:
        summary = database.write(lambda session: create_pool(session, pool, specs))
    if as_json:
        print_json(summary)
        return
    console.print(
        f"pool [bold]{pool}[/]: {summary['devices']} devices over {len(specs)} fabric(s) ({', '.join(fabric)})"
    )


@matrix_app.command("list")
@user_errors_exit_2
def list_pools(db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """List the pools."""
    from matrixstack.matrix import pools as matrix_pools

    with _database(db) as database:
        pools = database.read(matrix_pools.list_pools)
    if as_json:
        print_json(pools)
        return
    table = Table(title="pools")
    for column in ("pool", "fabrics", "devices", "allocated", "failed", "slices"):
        table.add_column(column)
    for p in pools:
        fabrics = ", ".join(sorted(set(p["fabrics"])))
        table.add_row(
            p["pool"],
            f"{len(p['fabrics'])} x {fabrics}",
            *(str(p[k]) for k in ("devices", "allocated", "failed", "slices")),
        )
    console.print(table)


@matrix_app.command("alloc")
@user_errors_exit_2
def alloc(
    devices: int | None = typer.Option(None, "--devices", help="Devices in the slice."),
    dies: int | None = typer.Option(None, "--dies", help="Dies (ranks) instead of devices; rounded up to devices."),
    tenant: str = typer.Option(..., "--tenant", help="The tenant that will own the slice."),
    policy: str = typer.Option("matrix", "--policy", help=f"Placement policy. {POLICY_TEXT}."),
    within_tier: str | None = typer.Option(
        None, "--within-tier", help="Highest switch tier the slice may span: number from 1 or name (e.g. 1, L1)."
    ),
    cross_domain: bool = typer.Option(False, "--cross-domain", help="Allow the slice to span scale-up domains."),
    whole_nodes: bool = typer.Option(False, "--whole-nodes", help="Whole nodes only (devices rounded up)."),
    host_cpus: int = typer.Option(0, "--host-cpus", help="Host CPU sockets, pooled over the scale-up domain."),
    dram_gib: float = typer.Option(0.0, "--dram-gib", help="Pooled host DRAM in GiB."),
    pool: str = PoolOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Allocate a slice to a tenant."""
    if (devices is None) == (dies is None):
        raise UserError("give exactly one of --devices N or --dies N")
    if (devices is not None and devices < 1) or (dies is not None and dies < 1) or host_cpus < 0 or dram_gib < 0:
        raise UserError("--devices / --dies must be at least 1, --host-cpus and --dram-gib at least 0")
    request = SliceRequest(
        devices=devices,
        dies=dies,
        host_cpus=host_cpus,
        dram_gib=dram_gib,
        constraints=SliceConstraints(within_domain=not cross_domain, max_tier=within_tier, whole_nodes=whole_nodes),
    )
    from matrixstack.adapt.jobs import reclaim_dead
    from matrixstack.matrix.slices import alloc_slice

    reclaim_dead(db)  # a killed tune job's slice is free for this allocation
    with _database(db) as database:
        info = database.write(lambda session: alloc_slice(session, pool, tenant, request, policy))
    _print_slice(info, "allocated", as_json)


@matrix_app.command("free")
@user_errors_exit_2
def free(
    slice_id: int = typer.Argument(..., help="Slice id."),
    tenant: str | None = typer.Option(None, "--tenant", help="Act as this tenant (default: the operator)."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Free a slice."""
    from matrixstack.matrix.slices import free_slice

    with _database(db) as database:
        info = database.write(lambda session: free_slice(session, slice_id, tenant))
    _print_slice(info, "freed", as_json)


@matrix_app.command("resize")
@user_errors_exit_2
def resize(
    slice_id: int = typer.Argument(..., help="Slice id."),
    devices: int = typer.Option(..., "--devices", help="New number of devices."),
    tenant: str | None = typer.Option(None, "--tenant", help="Act as this tenant (default: the operator)."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Grow or shrink a slice, inside the domain it was placed in."""
    from matrixstack.matrix.slices import resize_slice

    with _database(db) as database:
        info = database.write(lambda session: resize_slice(session, slice_id, devices, tenant))
    _print_slice(info, "resized", as_json)


@matrix_app.command("fail")
@user_errors_exit_2
def fail(
    device: str = typer.Option(..., "--device", help="Device: F:D (fabric index in the pool, device id) or D."),
    reason: str = typer.Option("failed", "--reason", help="Why (kept in the failure record and the event log)."),
    pool: str = PoolOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Mark a device failed; its slice gets a replacement from the same domain, or is marked degraded."""
    from matrixstack.matrix.failures import fail_device

    at = _parse_device(device)
    with _database(db) as database:
        result = database.write(lambda session: fail_device(session, pool, at, reason))
    if as_json:
        print_json(result)
        return
    line = f"device {result['device']} failed ({reason})"
    if result["action"] == "replaced":
        line += f"; slice {result['slice']} got {', '.join(result['replacement'])} instead"
    elif result["action"] == "degraded":
        line += f"; slice {result['slice']} is degraded: {result['reason']}"
    else:
        line += "; it held no slice"
    console.print(line, highlight=False)


@matrix_app.command("repair")
@user_errors_exit_2
def repair(
    device: str = typer.Option(..., "--device", help="Device: F:D or D."),
    pool: str = PoolOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Return a failed device to service and heal degraded slices that can now be made whole."""
    from matrixstack.matrix.failures import repair_device

    at = _parse_device(device)
    with _database(db) as database:
        result = database.write(lambda session: repair_device(session, pool, at))
    if as_json:
        print_json(result)
        return
    healed = result["healed_slices"]
    console.print(
        f"device {result['device']} back in service"
        + (f"; healed slice(s) {', '.join(map(str, healed))}" if healed else ""),
        highlight=False,
    )


@matrix_app.command("show")
@user_errors_exit_2
def show(
    pool: str = PoolOption,
    tenant: str | None = typer.Option(None, "--tenant", help="Show what this tenant sees (default: everything)."),
    png: Path | None = typer.Option(None, "--png", help="Also draw the pool as a heat map to this PNG."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Show a pool: counts, slices, failures; --png draws nodes x devices coloured by slice."""
    from matrixstack.matrix.pools import show_pool

    with _database(db) as database:
        view = database.read(lambda session: show_pool(session, pool, tenant))
    if png is not None:
        from matrixstack.tools.draw.matrix import draw_pool

        draw_pool(view, png)
    if as_json:
        print_json(view.to_dict())
        return
    s = view.stats
    console.print(
        f"pool [bold]{view.name}[/]: {s['devices']} devices, {s['allocated']} allocated, {s['free']} free, "
        f"{s['failed']} failed, {s['whole_free_nodes']} wholly free nodes, fragmentation {s['fragmentation']:.1%}",
        highlight=False,
    )
    for f in view.fabrics:
        tiers = ", ".join(f"{t['number']}={t['name']} ({t['nodes_per_domain']} nodes)" for t in f["tiers"])
        console.print(f"  fabric {f['index']}: {f['name']}, {f['nodes']} x {f['devices_per_node']}; tiers {tiers}")
    table = Table(title=f"slices{f' of {tenant}' if tenant else ''}", title_justify="left")
    for column in ("id", "tenant", "state", "policy", "fabric", "devices", "nodes", "tier", "host CPUs", "DRAM GiB"):
        table.add_column(column)
    for sl in view.slices:
        table.add_row(
            str(sl.id),
            sl.tenant,
            sl.state,
            sl.policy,
            str(sl.fabric_index),
            f"{len(sl.devices)}: {ranges(sl.devices)}",
            ranges(sl.nodes),
            sl.tier or "-",
            str(sl.host_cpus),
            f"{sl.dram_gib:g}",
        )
    console.print(table)
    for failure in view.failures:
        console.print(f"  failed: {failure['device']} ({failure['reason']}) since {failure['failed_at']}")
    if view.tenants:
        console.print("  devices per tenant: " + ", ".join(f"{k} {v}" for k, v in sorted(view.tenants.items())))
    if png is not None:
        console.print(f"heat map drawn to {png}")


@matrix_app.command("events")
@user_errors_exit_2
def events(
    pool: str = PoolOption,
    tenant: str | None = typer.Option(None, "--tenant", help="Only events about this tenant's slices."),
    limit: int = typer.Option(50, "--limit", help="Most recent events to show."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Show the pool's event log (every mutation), oldest first."""
    from matrixstack.matrix.events import list_events

    with _database(db) as database:
        rows = database.read(lambda session: list_events(session, pool, tenant, limit))
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"events of pool {pool}", title_justify="left")
    for column in ("id", "at", "kind", "tenant", "slice", "detail"):
        table.add_column(column)
    for e in rows:
        detail = ", ".join(f"{k}={ranges(v) if isinstance(v, list) and all(isinstance(x, int) for x in v) else v}"
                           for k, v in e["detail"].items())  # fmt: skip
        table.add_row(str(e["id"]), e["at"][:19], e["kind"], e["tenant"] or "-", str(e["slice"] or "-"), detail)
    console.print(table)


@matrix_app.command("simulate")
@user_errors_exit_2
def simulate(
    fabric: str = typer.Option("cloudmatrix384", "--fabric", help="Fabric of each pod: name or YAML path."),
    count: int = typer.Option(4, "--count", help="Pods in the fleet."),
    policy: str = typer.Option(",".join(POLICIES), "--policy", help="Policies to compare, comma-separated."),
    jobs: int = typer.Option(5000, "--jobs", help="Jobs to generate (ignored with --trace)."),
    seed: int = typer.Option(1, "--seed", help="Seed of the job generator."),
    trace: Path | None = typer.Option(None, "--trace", help="Replay this CSV trace instead of generating jobs."),
    write_trace: Path | None = typer.Option(None, "--write-trace", help="Write the generated jobs as a CSV trace."),
    load: float = typer.Option(1.0, "--load", help="Offered load of generated jobs (1.0 = the fleet's devices)."),
    mean_devices: float = typer.Option(10.08, "--mean-devices", help="Mean job size of generated jobs."),
    pod_nodes: str | None = typer.Option(
        None, "--pod-nodes", help="Pod-size sweep: node counts, e.g. 28,36,48 (224, 288, 384 NPUs)."
    ),
    window: int = typer.Option(16, "--window", help="Waiting jobs the scheduler looks at per pass (1 = FIFO)."),
    max_wait_s: float | None = typer.Option(None, "--max-wait-s", help="A job gives up after this wait (s)."),
    png: Path | None = typer.Option(None, "--png", help="Draw the results to this PNG."),
    as_json: bool = JsonOption,
) -> None:
    """Replay a job mix on a fleet under each policy: utilisation, rejections, wait, fragmentation."""
    from matrixstack.matrix import simulate as sim
    from matrixstack.matrix.trace import JobMix, generate, read_trace
    from matrixstack.matrix.trace import write_trace as save_trace

    policies = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        raise UserError(f"unknown policy {', '.join(unknown) or '(none)'}; choose from {', '.join(POLICIES)}")
    if count < 1:
        raise UserError("--count must be at least 1")
    spec = load_fabric(fabric)
    mix = JobMix(mean_devices=mean_devices, load=load)
    if trace is not None:
        job_list = read_trace(trace)
    else:
        job_list = generate(mix, jobs, spec.device_count * count, spec.scale_up_domain_size, seed)
    if write_trace is not None:
        save_trace(job_list, write_trace)
    options = {"window": window, "max_wait_s": max_wait_s}
    results = sim.simulate(spec, count, policies, job_list, **options)
    sweep = None
    if pod_nodes:
        try:
            nodes = [int(n) for n in pod_nodes.split(",") if n.strip()]
        except ValueError:
            raise UserError(f"--pod-nodes {pod_nodes!r} is not a comma-separated list of node counts") from None
        given = job_list if trace is not None else None
        sweep = sim.pod_size_sweep(spec, count, nodes, jobs, seed, mix=mix, trace_jobs=given, **options)
    if png is not None:
        from matrixstack.tools.draw.matrix import draw_simulation

        draw_simulation(results, sweep, png)
    if as_json:
        out = {"fabric": spec.name, "pods": count, "jobs": len(job_list), "seed": seed}
        out["results"] = [r.to_dict() for r in results]
        if sweep is not None:
            out["pod_size_sweep"] = [p.to_dict() for p in sweep]
        print_json(out)
        return
    table = Table(title=f"{count} x {spec.name}, {len(job_list)} jobs", title_justify="left")
    for column in ("policy", "utilisation", "allocated", "stranded", "rejected", "mean wait", "fragmentation"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.policy,
            f"{r.utilisation:.1%}",
            f"{r.allocation:.1%}",
            f"{r.stranded:.1%}",
            f"{r.rejection_rate:.1%}",
            f"{r.mean_wait_s / 60:.1f} min",
            f"{r.fragmentation:.1%}",
        )
    console.print(table)
    if sweep is not None:
        table = Table(title=f"pod-size sweep ({sweep[0].result.policy})", title_justify="left")
        for column in ("nodes", "devices per pod", "utilisation", "rejected", "mean wait"):
            table.add_column(column)
        for p in sweep:
            table.add_row(
                str(p.nodes),
                str(p.pod_devices),
                f"{p.result.utilisation:.1%}",
                f"{p.result.rejection_rate:.1%}",
                f"{p.result.mean_wait_s / 60:.1f} min",
            )
        console.print(table)
    if png is not None:
        console.print(f"results drawn to {png}")
