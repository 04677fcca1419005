"""Persisted state of pools: SQLAlchemy 2.0 tables, and opening a database by URL. No operations here.

Tables: `pools`, `pool_fabrics` (the full fabric spec as JSON, so a pool outlives its YAML file),
`tenants`, `slices` (owner, policy, constraints, state `active` / `degraded` / `freed`), `slice_devices`
(one row per device a live slice holds), `slice_hosts` (host CPUs and DRAM GiB per node), `failures`
(open while `repaired_at` is null) and `events` (one row per mutation).

The database itself forbids handing out a device twice: `slice_devices` has UNIQUE(pool_id, fabric_index,
device), and a partial unique index allows one open failure per device. The services lock the pool row
before they read the state they decide on; these constraints are the last line of defence behind that lock.

URLs: `sqlite:///PATH` (the default is `matrixstack.db` under the data directory: `$MATRIXSTACK_HOME`, else
`$XDG_DATA_HOME/matrixstack`, else `~/.local/share/matrixstack`) or `postgresql+psycopg://USER@HOST:PORT/DB`
(`postgresql://` is read as psycopg 3). SQLite runs in WAL mode with a 30 s busy timeout, and every write
transaction starts with `BEGIN IMMEDIATE`, so two writers queue instead of failing late. The SQLite file and its
-wal and -shm are 0600, the data directory holding the default file 0700: only their owner reads the state.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool

from matrixstack.datakey import private_dir
from matrixstack.errors import UserError
from matrixstack.paths import data_dir

SQLITE_BUSY_TIMEOUT_S = 30.0
WRITE_OPTION = "matrixstack_write"  # execution option: False makes a SQLite transaction a plain deferred BEGIN


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """Return a timestamp as ISO 8601 in UTC (SQLite hands back naive datetimes; they were stored in UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


class Base(DeclarativeBase):
    """Declarative base of the matrix tables."""

    type_annotation_map = {dict[str, Any]: JSON}


class PoolRow(Base):
    """A pool: a name over one or more fabrics."""

    __tablename__ = "pools"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    fabrics: Mapped[list[PoolFabricRow]] = relationship(order_by="PoolFabricRow.fabric_index", lazy="selectin")


class PoolFabricRow(Base):
    """One fabric of a pool, by its index in the pool, with its spec frozen as JSON."""

    __tablename__ = "pool_fabrics"
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"), primary_key=True)
    fabric_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    fabric_name: Mapped[str] = mapped_column(String(128))
    spec_json: Mapped[str] = mapped_column(Text)


class TenantRow(Base):
    """A tenant: the owner of slices."""

    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SliceRow(Base):
    """A slice handed out from a pool: owner, policy, what was asked, where it may lie, and its state."""

    __tablename__ = "slices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    fabric_index: Mapped[int] = mapped_column(Integer)
    policy: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # active | degraded | freed
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    requested_devices: Mapped[int] = mapped_column(Integer)
    requested_dies: Mapped[int | None] = mapped_column(Integer, nullable=True)
    device_count: Mapped[int] = mapped_column(Integer)  # devices the slice should hold (server rounds up)
    host_cpus: Mapped[int] = mapped_column(Integer, default=0)
    dram_gib: Mapped[float] = mapped_column(Float, default=0.0)
    within_domain: Mapped[bool] = mapped_column(Boolean, default=True)
    max_tier: Mapped[str | None] = mapped_column(String(64), nullable=True)
    whole_nodes: Mapped[bool] = mapped_column(Boolean, default=False)
    ceiling: Mapped[int] = mapped_column(Integer)  # 0-based highest tier allowed, resolved at allocation
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    freed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    tenant: Mapped[TenantRow] = relationship(lazy="joined")


class SliceDeviceRow(Base):
    """One device a live slice holds. UNIQUE(pool, fabric, device): the database forbids double allocation."""

    __tablename__ = "slice_devices"
    __table_args__ = (UniqueConstraint("pool_id", "fabric_index", "device", name="uq_slice_devices_device"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slice_id: Mapped[int] = mapped_column(ForeignKey("slices.id", ondelete="CASCADE"), index=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"))
    fabric_index: Mapped[int] = mapped_column(Integer)
    device: Mapped[int] = mapped_column(Integer)


class SliceHostRow(Base):
    """Host CPUs (sockets) and DRAM GiB a live slice holds on one node."""

    __tablename__ = "slice_hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slice_id: Mapped[int] = mapped_column(ForeignKey("slices.id", ondelete="CASCADE"), index=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"), index=True)
    fabric_index: Mapped[int] = mapped_column(Integer)
    node: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[int] = mapped_column(Integer)
    dram_gib: Mapped[float] = mapped_column(Float)


class FailureRow(Base):
    """A device failure; open while `repaired_at` is null. At most one open failure per device."""

    __tablename__ = "failures"
    __table_args__ = (
        Index(
            "uq_failures_open_device",
            "pool_id",
            "fabric_index",
            "device",
            unique=True,
            sqlite_where=text("repaired_at IS NULL"),
            postgresql_where=text("repaired_at IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"), index=True)
    fabric_index: Mapped[int] = mapped_column(Integer)
    device: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    repaired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EventRow(Base):
    """One mutation of a pool: kind, who, which slice, and the details as JSON."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slice_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def default_url() -> str:
    """Return the URL of the default database: the SQLite file `matrixstack.db` in the data directory."""
    return f"sqlite:///{data_dir() / 'matrixstack.db'}"


URL_HINT = "use sqlite:///PATH/FILE.db or postgresql+psycopg://USER@HOST:PORT/DB, or leave --db out for the default"


def open_engine(url: str | None = None) -> Engine:
    """Return an engine on the database at `url` (the default SQLite file when None), with the tables created.

    Raises a UserError naming the URL (password hidden) and the fix when the URL is malformed, names an
    unsupported database, or the database cannot be reached.
    """
    text = url or default_url()
    try:
        parsed = make_url(text)
    except ArgumentError:
        raise UserError(f"--db {text!r} is not a database URL; {URL_HINT}") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = _sqlite_engine(parsed)
    elif backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            engine = create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        except (NoSuchModuleError, ImportError) as exc:
            raise UserError(f"database {shown}: driver unavailable ({exc}); use postgresql+psycopg://") from None
    else:
        raise UserError(f"database {shown}: {backend!r} is not supported; {URL_HINT}")
    try:
        Base.metadata.create_all(engine)
    except DBAPIError as exc:
        engine.dispose()
        first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise UserError(f"cannot open database {shown}: {first}; check the URL, the server and its rights") from None
    return engine


def _private_database_file(path: Path) -> None:
    """Make the SQLite file `path` (created empty when missing) and its -wal and -shm files 0600 (those this user
    owns), its folder 0700 when it is the data directory (another folder is made 0700 only when created here).
    SQLite gives the -wal and -shm files it creates the database file's mode."""
    if path.parent == data_dir():
        private_dir(path.parent)
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():  # never open an existing one: closing any descriptor of a SQLite file drops every POSIX
        # lock this process's connections hold on it, and another process may then delete the WAL they write to
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        if file.exists() and file.stat().st_uid == os.getuid():  # another user's file keeps the mode they gave it
            file.chmod(0o600)


def _sqlite_engine(parsed) -> Engine:
    """Return a SQLite engine: WAL, busy timeout, foreign keys, BEGIN IMMEDIATE for write transactions."""
    database = parsed.database
    if database and database != ":memory:":
        path = Path(database).expanduser()
        try:
            _private_database_file(path)
        except OSError as exc:
            raise UserError(f"cannot create database file {path} (or its folder): {exc.strerror}") from None
        engine = create_engine(parsed.set(database=str(path)), connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        wal = True
    else:  # in memory: one connection shared by everyone, or each would see its own empty database
        engine = create_engine(parsed, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        wal = False

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver must not open transactions; _on_begin does
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, True)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
