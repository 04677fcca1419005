"""`matrixstack tune ...`: fine-tuning jobs on slices of a pool: start (or resume) one, list, show, cancel.

`matrixstack tune BASE --dataset N --out NAME ...` is `tune start BASE ...` (the group runs `start` when its first
word is not one of its commands). A job runs in the foreground of the command: it takes a slice of `--devices`
devices from `--pool` (created over the `local` fabric, this machine, when it does not exist), trains with a progress
bar, and ends with the adapter in PEFT's format under the data directory's adapters/NAME and its evaluation. Every
command first marks failed the jobs whose process died without saying so, freeing their slices
(`adapt.jobs.sweep_dead`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from matrixstack.cli.common import console, print_json, user_errors_exit_2
from matrixstack.cli.matrix_cmd import DbOption, JsonOption, PoolOption
from matrixstack.errors import UserError

if TYPE_CHECKING:  # the services pull in SQLAlchemy and torch: import them only when a command runs
    from matrixstack.adapt.jobs import JobInfo
    from matrixstack.matrix.database import Database

DEFAULT_COMMAND = "start"


class _DefaultStart(TyperGroup):
    """A group whose first word, when it is not one of its commands (or --help), starts `start`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


tune_app = typer.Typer(
    cls=_DefaultStart,
    help="Fine-tuning jobs: `tune BASE --dataset N --out NAME` trains a LoRA adapter on a slice; list, show, cancel.",
    no_args_is_help=True,
)
TenantOption = typer.Option(None, "--tenant", help="Act as this tenant (default: the operator).")


def _database(db: str | None, with_catalog: bool = False) -> Database:
    """Return the database with the matrix and adapt tables (and the portal's, for --register)."""
    from matrixstack.adapt.job_store import open_tune_database

    if with_catalog:
        from matrixstack.portal.store import open_portal_database

        open_portal_database(db).close()
    database = open_tune_database(db)
    from matrixstack.adapt.jobs import sweep_dead

    database.write(sweep_dead)
    return database


def _ensure_pool(database: Database, pool: str) -> None:
    """Create `pool` over the `local` fabric (this machine) when it does not exist."""
    from matrixstack.fabric.loader import load_fabric
    from matrixstack.matrix.pools import create_pool, list_pools

    def write(session) -> None:
        if pool not in {p["pool"] for p in list_pools(session)}:
            create_pool(session, pool, [load_fabric("local")])

    database.write(write)


def _spec(values: dict[str, Any]):
    """Return the TuneSpec of the command's options; UserError naming a bad one."""
    from matrixstack.adapt.lora import check_rank, parse_targets, target_paths
    from matrixstack.adapt.spec import TuneSpec
    from matrixstack.arch import load_arch
    from matrixstack.engine.lora_adapter import lora_modules
    from matrixstack.specio import validate_spec

    missing = [flag for flag, key in (("BASE", "base"), ("--dataset", "dataset"), ("--out", "out")) if not values[key]]
    if missing:
        raise UserError(f"tune needs {', '.join(missing)} (or --resume JOB to continue a job)")
    if values["method"] != "lora":
        raise UserError(f"--method {values['method']}: only lora is supported")
    values["targets"] = parse_targets(values.pop("target"))
    spec = validate_spec(TuneSpec, values, "tune options")
    check_rank(spec.rank, spec.alpha)
    target_paths(lora_modules(load_arch(spec.base)), spec.base, spec.targets)  # before its weights are looked for
    return spec


@tune_app.command(DEFAULT_COMMAND)
@user_errors_exit_2
def start(
    base: str | None = typer.Argument(None, help="Base arch (its weights packaged or added with `model add`)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset name (`dataset add`), the tenant's own."),
    method: str = typer.Option("lora", "--method", help="Fine-tuning method: lora."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank (1-64)."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scaling = alpha / rank)."),
    target: str = typer.Option("q,k,v,o", "--target", help="Attention projections to adapt: q,k,v,o."),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the training rows."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs)."),
    lr: float = typer.Option(2e-4, "--lr", help="AdamW learning rate (constant)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per optimizer step, over all devices."),
    seed: int = typer.Option(0, "--seed", help="Seed of the LoRA init and the data order."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints."),
    devices: int = typer.Option(1, "--devices", help="Devices of the slice (data-parallel ranks)."),
    max_len: int = typer.Option(512, "--max-len", help="Tokens per example (prompt + answer); longer are cut."),
    out: str | None = typer.Option(None, "--out", help="Adapter name: the folder adapters/NAME."),
    register: str | None = typer.Option(None, "--register", help="Add this L1 catalog entry with the adapter."),
    tenant: str | None = TenantOption,
    resume: int | None = typer.Option(None, "--resume", help="Continue this failed or killed job."),
    pool: str = PoolOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Start a fine-tuning job (or --resume one) and run it to its adapter."""
    options = dict(locals())
    from matrixstack.adapt.jobs import resume_job, submit_job
    from matrixstack.adapt.spec import TuneSpec
    from matrixstack.adapt.tune import check_spec, run_job

    with _database(db, with_catalog=register is not None) as database:
        if resume is not None:
            if base is not None or dataset is not None or out is not None:
                raise UserError("--resume JOB continues a job with its own settings; drop BASE, --dataset and --out")
            job, info = database.write(lambda session: resume_job(session, resume, tenant))
            spec = TuneSpec.model_validate(job.config)
        else:
            keys = ("base", "dataset", "method", "rank", "alpha", "target", "epochs", "steps", "lr", "batch_size",
                    "seed", "checkpoint_every", "devices", "max_len", "out")  # fmt: skip
            spec = _spec({key: options[key] for key in keys})
            check_spec(spec)
        if register is not None:
            from matrixstack.cli.tune_register import check_registration

            database.read(lambda session: check_registration(session, register, spec.base))
        if resume is None:
            _ensure_pool(database, pool)
            job, info = database.write(lambda session: submit_job(session, tenant, spec, pool))
        if not as_json:
            console.print(
                f"tune job [bold]{job.id}[/]: {spec.base} + LoRA r={spec.rank} on {spec.dataset}, slice {info.id} "
                f"({len(info.devices)} device(s) of pool {info.pool})",
                highlight=False,
            )
        done = run_job(database, db, job, info, tenant)
        entry = None
        if register is not None:
            from matrixstack.cli.tune_register import register_l1

            text = f"LoRA adapter {spec.out} of {spec.base} on dataset {spec.dataset} (tune job {job.id})"
            entry = database.write(lambda session: register_l1(session, register, spec.base, spec.out, tenant, text))
    if as_json:
        print_json({**done.view(), "registered": None if entry is None else entry.view()})
        return
    _print_result(done)
    if entry is not None:
        console.print(f"registered L1 [bold]{entry.name}[/] under {entry.parent} with adapter {entry.adapter}")


def _print_result(job: JobInfo) -> None:
    """Print a finished job's adapter, evaluation and files."""
    result = job.result
    train = result.get("train", {})
    console.print(f"job {job.id} {job.status}: adapter {job.adapter_path}", highlight=False)
    console.print(
        f"  {train.get('steps')} steps, {train.get('tokens_per_s')} tokens/s, final training loss "
        f"{train.get('final_loss')}",
        highlight=False,
    )
    for when in ("before", "after"):
        ev = result.get(when, {})
        if ev.get("examples"):  # a dataset without a held-out split has nothing measured
            console.print(
                f"  held-out {when}: loss {ev['loss']:.4f}, exact match {ev['exact_match']:.1%} "
                f"({ev['examples']} examples)",
                highlight=False,
            )
    console.print(f"  log {result.get('log')}, loss curve {result.get('loss_png')}", highlight=False)


@tune_app.command("list")
@user_errors_exit_2
def list_jobs(tenant: str | None = TenantOption, db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """List the tune jobs (the tenant's own, or all for the operator)."""
    from matrixstack.adapt.jobs import list_jobs as jobs_of

    with _database(db) as database:
        jobs = database.read(lambda session: jobs_of(session, tenant))
    if as_json:
        print_json([j.view() for j in jobs])
        return
    table = Table(title="tune jobs")
    for column in ("id", "tenant", "base", "dataset", "status", "progress", "slice", "adapter"):
        table.add_column(column)
    for j in jobs:
        progress = f"{j.progress['step']}/{j.progress['steps']}" if j.progress else "-"
        table.add_row(
            str(j.id),
            j.tenant or "-",
            j.base,
            j.dataset,
            j.status,
            progress,
            str(j.slice_id or "-"),
            j.config.get("out", "-"),
        )
    console.print(table)


def _show_job(database: Database, job_id: int, tenant: str | None) -> JobInfo:
    """Return the job (UnknownJob when the tenant has none of that id)."""
    from matrixstack.adapt.jobs import get_job

    return database.read(lambda session: get_job(session, job_id, tenant))


def _print_job(job: JobInfo) -> None:
    """Print a job's state, its error, and a finished job's result."""
    p = job.progress
    progress = f"step {p['step']}/{p['steps']}, loss {p['loss']}" if p else "no checkpoint yet"
    console.print(
        f"job {job.id} ({job.tenant or 'operator'}): {job.base} on {job.dataset}, {job.status}, pool {job.pool}, "
        f"slice {job.slice_id or '-'}, {progress}",
        highlight=False,
    )
    if job.error:
        console.print(f"  error: {job.error}", highlight=False)
    if job.status == "succeeded":
        _print_result(job)


def _cancel_job(database: Database, job_id: int, tenant: str | None) -> JobInfo:
    """Stop the job's process if it runs, mark it cancelled, free its slice; return it."""
    from matrixstack.adapt.jobs import cancel_job, stop_process

    database.read(lambda session: stop_process(session, job_id, tenant))
    return database.write(lambda session: cancel_job(session, job_id, tenant))


def _job_command(
    name: str, help_text: str, act: Callable[[Database, int, str | None], JobInfo], say: Callable[[JobInfo], None]
) -> None:
    """Register `tune NAME JOB [--tenant T] [--db URL] [--json]`: `act` on the job, then print it (`say`, or JSON)."""

    @tune_app.command(name, help=help_text)
    @user_errors_exit_2
    def command(
        job_id: int = typer.Argument(..., help="Job id."),
        tenant: str | None = TenantOption,
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        with _database(db) as database:
            job = act(database, job_id, tenant)
        if as_json:
            print_json(job.view())
        else:
            say(job)


_job_command("show", "Show a tune job: settings, status, progress, result.", _show_job, _print_job)
_job_command(
    "cancel",
    "Cancel a tune job: stop its process if it runs, free its slice.",
    _cancel_job,
    lambda job: console.print(f"job {job.id} cancelled; its slice is freed", highlight=False),
)
