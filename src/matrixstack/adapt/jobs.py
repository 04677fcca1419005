"""Tune jobs: submit, resume, finish, fail, cancel, list and show, each job on a slice of a matrix pool.

A job is a `tune_jobs` row (adapt/job_store.py) owned by a tenant (None: the operator's own). `submit_job` writes the
row and allocates its slice (`--devices` devices under the `matrix` policy) in the caller's unit of work, so a slice
that cannot be had leaves no row, and a row is never left without its slice while it runs. The slice belongs to the
job's tenant (the operator's jobs hold slices of tenant OPERATOR). It is freed when the job succeeds, fails or is
cancelled, and when its process died without saying so (SIGKILL, a power cut): `sweep_dead`, which every `tune`
command runs first, marks such a job failed and frees its slice; `tune --resume` then continues it on a new slice.
Every other command that allocates slices (`matrix alloc`, `shape import`, `up`) runs it first too, through
`reclaim_dead(url)`, so a killed job's devices are never refused to the next user of the pool.
A process is the job's while a process of the recorded pid runs with the recorded start time (/proc; a reused pid is
another process).

Visibility: a tenant sees its own jobs, another tenant's job id is "not found"; `tenant=None` is the operator's view
of every job. The functions take the caller's session and never commit (`matrix.database`); `record_progress` opens
the database itself (it runs in the training process).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from matrixstack.adapt.datasets import find_dataset
from matrixstack.adapt.job_store import TuneJobRow, open_tune_database
from matrixstack.adapt.spec import TuneSpec
from matrixstack.errors import UserError
from matrixstack.matrix.slices import SliceInfo, alloc_slice, free_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.matrix.store import SliceRow, TenantRow, iso, utcnow
from matrixstack.matrix.tenants import check_name, tenant_id
from matrixstack.procs import start_time

OPERATOR = "operator"  # the tenant that holds the slices of the operator's own jobs
LIVE = ("queued", "running")
RESUMABLE = ("failed",)
STOP_WAIT_S = 10.0
POLL_S = 0.05


class UnknownJob(UserError):
    """A job id the caller has no job of (another tenant's included)."""


@dataclass(frozen=True)
class JobInfo:
    """A job as `tune list` / `tune show` tell it."""

    id: int
    tenant: str | None
    base: str
    dataset: str
    status: str
    pool: str
    slice_id: int | None
    pid: int | None
    progress: dict[str, Any]
    result: dict[str, Any]
    adapter_path: str | None
    error: str | None
    config: dict[str, Any]
    created: str
    finished: str | None

    def view(self) -> dict[str, Any]:
        """Return the job as a JSON-ready dict."""
        return asdict(self)


def runs(row: TuneJobRow) -> bool:
    """Return whether the process recorded for the job still runs (same pid, same start time)."""
    return row.pid is not None and row.pid_start is not None and start_time(row.pid) == row.pid_start


def slice_tenant(tenant: str | None) -> str:
    """Return the tenant that holds a job's slice: the job's own, OPERATOR for the operator's jobs."""
    return OPERATOR if tenant is None else tenant


def submit_job(session: Session, tenant: str | None, spec: TuneSpec, pool: str) -> tuple[JobInfo, SliceInfo]:
    """Write a running job of this process for `spec` and allocate its slice; return both. UserError (nothing
    written) when the dataset is not the tenant's, the adapter name is another live or finished job's, or the
    slice cannot be had."""
    if tenant is not None:
        check_name(tenant, "tenant")
    find_dataset(session, spec.dataset, tenant)
    taken = session.scalars(
        select(TuneJobRow.id).where(
            TuneJobRow.status.in_((*LIVE, "succeeded")), TuneJobRow.config["out"].as_string() == spec.out
        )
    ).first()
    if taken is not None:
        raise UserError(f"--out {spec.out}: job {taken} makes (or made) that adapter; pick another name")
    row = TuneJobRow(
        tenant_id=None if tenant is None else tenant_id(session, tenant),
        base=spec.base,
        dataset=spec.dataset,
        config=spec.model_dump(mode="json"),
        status="running",
        pool=pool,
    )
    session.add(row)
    session.flush()
    info = _hold_slice(session, row, tenant)
    return _info(session, row), info


def resume_job(session: Session, job_id: int, tenant: str | None) -> tuple[JobInfo, SliceInfo]:
    """Mark a failed job running again in this process on a new slice; return it and the slice. UserError when it
    is not resumable (running elsewhere, finished, cancelled) or no slice can be had."""
    row = _row(session, job_id, tenant)
    if row.status not in RESUMABLE:
        raise UserError(
            f"job {job_id} is {row.status}; only a failed or killed job resumes"
            + (f" (it runs as pid {row.pid}: `tune cancel {job_id}` stops it)" if row.status == "running" else "")
        )
    row.status, row.error, row.finished_at = "running", None, None
    info = _hold_slice(session, row, tenant)
    return _info(session, row), info


def _hold_slice(session: Session, row: TuneJobRow, tenant: str | None) -> SliceInfo:
    """Allocate the job's slice and record it and this process on the row; UserError naming the pool's answer."""
    spec = TuneSpec.model_validate(row.config)
    try:
        info = alloc_slice(session, row.pool, slice_tenant(tenant), SliceRequest(devices=spec.devices), "matrix")
    except UserError as exc:
        raise UserError(f"tune job: no slice of {spec.devices} device(s): {exc}") from None
    row.slice_id, row.pid, row.pid_start = info.id, os.getpid(), start_time(os.getpid())
    return info


def _release(session: Session, row: TuneJobRow) -> None:
    """Free the job's slice when it still holds a live one."""
    if row.slice_id is not None:
        held = session.get(SliceRow, row.slice_id)
        if held is not None and held.state != "freed":
            free_slice(session, row.slice_id)
        row.slice_id = None


def finish_job(session: Session, job_id: int, result: dict[str, Any], adapter_path: Path) -> JobInfo:
    """Mark the job succeeded with its result and adapter folder, free its slice; return it."""
    row = _row(session, job_id, None)
    row.status, row.result, row.adapter_path, row.finished_at = "succeeded", result, str(adapter_path), utcnow()
    _release(session, row)
    return _info(session, row)


def fail_job(session: Session, job_id: int, error: str) -> JobInfo:
    """Mark the job failed with `error`, free its slice; return it (a failed job may be resumed)."""
    row = _row(session, job_id, None)
    row.status, row.error, row.finished_at = "failed", error, utcnow()
    _release(session, row)
    return _info(session, row)


def sweep_dead(session: Session) -> list[int]:
    """Mark failed every live job whose process no longer runs and free its slice; return their ids."""
    swept = []
    for row in session.scalars(select(TuneJobRow).where(TuneJobRow.status.in_(LIVE))):
        if not runs(row):
            row.status, row.finished_at = "failed", utcnow()
            row.error = f"its process (pid {row.pid}) ended without finishing; resume it with `tune --resume {row.id}`"
            _release(session, row)
            swept.append(row.id)
    return swept


def reclaim_dead(url: str | None) -> list[int]:
    """Run `sweep_dead` in the database at `url` (its adapt tables created when missing); return the swept ids."""
    with open_tune_database(url) as database:
        return database.write(sweep_dead)


def stop_process(session: Session, job_id: int, tenant: str | None) -> None:
    """Kill the process of a live job (SIGKILL: its training processes die with it) and wait until it is gone;
    UnknownJob when the caller has no such job."""
    row = _row(session, job_id, tenant)
    if row.status in LIVE and runs(row):
        os.kill(row.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_WAIT_S
        while start_time(row.pid) == row.pid_start and time.monotonic() < deadline:
            time.sleep(POLL_S)


def cancel_job(session: Session, job_id: int, tenant: str | None) -> JobInfo:
    """Mark a job cancelled and free its slice (its process stopped first: `stop_process`); return it. UserError
    when the job finished already or its process still runs."""
    row = _row(session, job_id, tenant)
    if row.status in ("succeeded", "cancelled"):
        raise UserError(f"job {job_id} is {row.status} already; nothing to cancel")
    if row.status in LIVE and runs(row):
        raise UserError(f"job {job_id}'s process (pid {row.pid}) still runs; it could not be stopped")
    row.status, row.finished_at = "cancelled", utcnow()
    _release(session, row)
    return _info(session, row)


def record_progress(db_url: str | None, job_id: int, step: int, steps: int, loss: float) -> None:
    """Write a job's progress (steps done of `steps`, the last loss) in its own unit of work."""

    def write(session: Session) -> None:
        session.get(TuneJobRow, job_id).progress = {"step": step, "steps": steps, "loss": round(loss, 6)}

    with open_tune_database(db_url) as database:
        database.write(write)


def list_jobs(session: Session, tenant: str | None) -> list[JobInfo]:
    """Return the jobs `tenant` may see (all for the operator), oldest first."""
    query = select(TuneJobRow).order_by(TuneJobRow.id)
    if tenant is not None:
        query = query.join(TenantRow, TenantRow.id == TuneJobRow.tenant_id).where(TenantRow.name == tenant)
    return [_info(session, row) for row in session.scalars(query)]


def get_job(session: Session, job_id: int, tenant: str | None) -> JobInfo:
    """Return a job `tenant` may see; UnknownJob otherwise."""
    return _info(session, _row(session, job_id, tenant))


def _row(session: Session, job_id: int, tenant: str | None) -> TuneJobRow:
    """Return the row of a job `tenant` (None: anyone) may see; UnknownJob otherwise."""
    row = session.get(TuneJobRow, job_id)
    owner = None if row is None or row.tenant_id is None else session.get(TenantRow, row.tenant_id).name
    if row is None or (tenant is not None and owner != tenant):
        whose = "" if tenant is None else f" of tenant {tenant!r}"
        raise UnknownJob(
            f"no tune job {job_id}{whose}; see `matrixstack tune list{'' if tenant is None else ' --tenant ' + tenant}`"
        )
    return row


def _info(session: Session, row: TuneJobRow) -> JobInfo:
    """Return the JobInfo of a row."""
    owner = None if row.tenant_id is None else session.get(TenantRow, row.tenant_id).name
    return JobInfo(
        id=row.id, tenant=owner, base=row.base, dataset=row.dataset, status=row.status, pool=row.pool,
        slice_id=row.slice_id, pid=row.pid, progress=dict(row.progress or {}), result=dict(row.result or {}),
        adapter_path=row.adapter_path, error=row.error, config=dict(row.config), created=iso(row.created_at),
        finished=None if row.finished_at is None else iso(row.finished_at),
    )  # fmt: skip
