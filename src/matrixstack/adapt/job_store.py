"""Persisted state of tune jobs: the `tune_jobs` table beside the matrix and dataset tables (same `AdaptBase`).

Table `tune_jobs`: one row per job: its owner (a matrix `tenants` row; null for the operator's own), base arch,
dataset name, the `TuneSpec` as JSON (`config`), status (queued / running / succeeded / failed / cancelled), the
pool and matrix slice it holds while it runs (slice_id null once freed), the process that runs it (pid and its
start time in clock ticks since boot, so a reused pid is not taken for it), progress ({step, steps, loss}), the
result metrics (evaluation before and after, tokens/s), the adapter folder, the error of a failed job, and when it
was created and finished.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from matrixstack.adapt.dataset_store import AdaptBase, open_adapt_database
from matrixstack.matrix.database import Database
from matrixstack.matrix.store import TenantRow, utcnow

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class TuneJobRow(AdaptBase):
    """A fine-tuning job: owner, base, dataset, config, status, slice, process, progress, result, adapter."""

    __tablename__ = "tune_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey(TenantRow.id), nullable=True, index=True)
    base: Mapped[str] = mapped_column(String(128))
    dataset: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    pool: Mapped[str] = mapped_column(String(64))
    slice_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    adapter_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def open_tune_database(url: str | None = None) -> Database:
    """Return the database at `url` (default: the data directory's SQLite file) with the matrix and adapt tables,
    `tune_jobs` included, created; UserError when it cannot be opened."""
    return open_adapt_database(url)
