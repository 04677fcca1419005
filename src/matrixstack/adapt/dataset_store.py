"""Persisted state of datasets: the `datasets` table beside the matrix tables, and where the files lie.

Table `datasets`: one row per dataset: its name, its owner (a matrix `tenants` row; null for the operator's own),
its shape, rows, the held-out split (the train fraction asked for, the shuffle's seed, and the 0-based indices of
the held-out rows, so the split never depends on a shuffle being re-run alike), the sha256 and size of its stored
file, and when it was added. A name is unique per owner (a partial unique index for the operator's, where the
owner is null: PostgreSQL and SQLite treat nulls as distinct in a plain UNIQUE).

Files: `<data dir>/datasets/<sha256>.jsonl`, the canonical bytes (`dataset_file`), mode 0600 in a folder 0700
(`datakey.private_dir`). Datasets with the same rows share one file. The files are on the machine that added them:
with a PostgreSQL database shared by several machines, a dataset is read where it was added.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from matrixstack.datakey import private_dir
from matrixstack.matrix.database import Database, open_database
from matrixstack.matrix.store import TenantRow, utcnow
from matrixstack.paths import data_dir

DATASETS_DIR = "datasets"


class AdaptBase(DeclarativeBase):
    """Declarative base of the adapt tables (created next to the matrix tables)."""


class DatasetRow(AdaptBase):
    """A dataset: name, owner, shape, rows, held-out split, and the sha256 of its stored file."""

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("owner_tenant_id", "name", name="uq_datasets_owner_name"),
        Index(
            "uq_datasets_operator_name",
            "name",
            unique=True,
            sqlite_where=text("owner_tenant_id IS NULL"),
            postgresql_where=text("owner_tenant_id IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    owner_tenant_id: Mapped[int | None] = mapped_column(ForeignKey(TenantRow.id), nullable=True, index=True)
    shape: Mapped[str] = mapped_column(String(16))  # chat | completion
    rows: Mapped[int] = mapped_column(Integer)
    split: Mapped[float | None] = mapped_column(Float, nullable=True)  # train fraction asked for; null: no split
    seed: Mapped[int] = mapped_column(Integer, default=0)
    heldout: Mapped[list[int]] = mapped_column(JSON, default=list)  # 0-based indices of the held-out rows
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def open_adapt_database(url: str | None = None) -> Database:
    """Return the database at `url` (default: the data directory's SQLite file) with the matrix and adapt tables
    created; UserError when it cannot be opened (`matrix.store.open_engine`)."""
    database = open_database(url)
    AdaptBase.metadata.create_all(database.engine)
    return database


def datasets_dir() -> Path:
    """Return the folder of the stored dataset files, `<data dir>/datasets` (not created here)."""
    return data_dir() / DATASETS_DIR


def dataset_path(sha256: str) -> Path:
    """Return where the dataset file with this sha256 lies."""
    return datasets_dir() / f"{sha256}.jsonl"


def write_dataset_file(sha256: str, canonical: bytes) -> tuple[Path, bool]:
    """Write the canonical bytes as the file of `sha256` (0600, in a 0700 folder), whole or not at all (a temporary
    file renamed into place); return (its path, whether this call created it: False when it was there already)."""
    path = dataset_path(sha256)
    if path.exists():
        return path, False
    private_dir(path.parent)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(canonical)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path, True
