"""Persisted state of the stack: the applied shape's metadata and its deployments, beside the matrix and portal
tables in the same database.

Tables: `stack_shapes` (one row: the last applied shape's name, description, fabric as given, site, and the
environment variables that hold the upstream secrets of its entries) and `stack_deployments` (each deployment's
full `DeploymentShape` as JSON, the matrix slice it holds, its plan, engine workers and perf's prediction).
Pools, slices, tenants, keys, catalog entries and registered deployments live in the matrix and portal tables.

`open_stack_database(url)` opens the database with every table created; an apply runs as ONE unit of work on it
(`matrix.database`): the matrix and portal services and the stack tables share its session, and it is committed
only when every step succeeded, so a failure in the middle (a slice that does not fit, a catalog rule) leaves the
database as it was.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from matrixstack.matrix.database import Database
from matrixstack.matrix.store import utcnow
from matrixstack.portal.store import open_portal_database

SHAPE_ROW_ID = 1  # a database holds one applied shape: the last one applied


class StackBase(DeclarativeBase):
    """Declarative base of the stack tables (created next to the matrix and portal tables)."""

    type_annotation_map = {dict[str, Any]: JSON}


class StackShapeRow(StackBase):
    """The applied shape's metadata: name, description, fabric as given, site, upstream secrets' variables."""

    __tablename__ = "stack_shapes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    fabric: Mapped[Any] = mapped_column(JSON)  # a fabric name or path (str), or an inline fabric spec (dict)
    fabric_name: Mapped[str] = mapped_column(String(128))  # the fabric's own name, as its pools know it
    site: Mapped[dict[str, Any]] = mapped_column(JSON)
    api_key_envs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # entry name -> variable name
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class StackDeploymentRow(StackBase):
    """A deployment of an applied shape: its shape as JSON, its slice, plan, workers and predicted rates."""

    __tablename__ = "stack_deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the DeploymentShape as given (plan: auto stays auto)
    pool: Mapped[str] = mapped_column(String(64))
    slice_id: Mapped[int] = mapped_column(Integer)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)  # the plan found (or given): InstancePlan or Plan
    workers: Mapped[int] = mapped_column(Integer)
    predicted: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


def open_stack_database(url: str | None = None) -> Database:
    """Return the database at `url` (default: the data directory's SQLite file) with the matrix, portal and stack
    tables created; UserError when it cannot be opened."""
    database = open_portal_database(url)
    StackBase.metadata.create_all(database.engine)
    return database


def read_shape_row(session: Session) -> StackShapeRow | None:
    """Return the applied shape's metadata row, or None before any shape was applied."""
    return session.get(StackShapeRow, SHAPE_ROW_ID)


def read_deployment_rows(session: Session) -> list[StackDeploymentRow]:
    """Return every stack deployment row in the order they were first applied."""
    return list(session.scalars(select(StackDeploymentRow).order_by(StackDeploymentRow.id)))
