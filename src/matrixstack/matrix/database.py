"""The unit of work: the one place that opens a read or write transaction on a database and commits it.

Callers own the unit of work. They open a `Database` (`open_database(url)` here for the matrix tables; the
portal's and the stack's stores open one with their tables added) and run an operation `op(session)` with
`read(op)` or `write(op)`. The services (`matrix.pools`, `matrix.slices`, `matrix.failures`, `matrix.events`,
`matrix.tenants`, the portal's `*_service` modules) are functions that take that session and never commit, so
several of them, from both layers, share one transaction when they run inside one op.

`write` starts a SQLite transaction with `BEGIN IMMEDIATE` (the database's write lock: two writers queue instead
of failing late), `read` with a plain deferred `BEGIN` (the `WRITE_OPTION` execution option tells the engine's
begin hook which); on PostgreSQL both are ordinary transactions and the services lock the rows they decide on.
A unit of work is committed when `op` returns and rolled back when it raises. On lock contention and
unique-constraint races it is run again from the start on fresh state, so `op` must do only database work it can
repeat; a database error that is not contention becomes a UserError naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.store import WRITE_OPTION, open_engine

RETRIES = 8
RETRY_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available
T = TypeVar("T")


class Database:
    """An opened database: runs read and write units of work on it (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._write = engine.execution_options(**{WRITE_OPTION: True})
        self._read = engine.execution_options(**{WRITE_OPTION: False})

    def read(self, op: Callable[[Session], T]) -> T:
        """Return `op(session)` run in one read transaction (retried on contention)."""
        return _transact(self._read, op)

    def write(self, op: Callable[[Session], T]) -> T:
        """Return `op(session)` run in one write transaction, committed (retried on contention)."""
        return _transact(self._write, op)

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_database(url: str | None = None) -> Database:
    """Return the database at `url` (the default SQLite file when None) with the matrix tables created; UserError
    when it cannot be opened (see `matrix.store.open_engine`)."""
    return Database(open_engine(url))


def _transact(bind: Engine, op: Callable[[Session], T]) -> T:
    """Return `op(session)` run in one transaction on `bind` and committed; retried on lock contention and
    unique-constraint races (the state is read again each time), then a UserError naming the database's error."""
    for attempt in range(RETRIES + 1):
        try:
            with Session(bind, expire_on_commit=False) as session:
                with session.begin():
                    return op(session)
        except IntegrityError:
            if attempt == RETRIES:
                raise UserError("the database refused a conflicting write several times; try again") from None
        except DBAPIError as exc:
            if not _retryable(exc) or attempt == RETRIES:
                first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
                raise UserError(f"database error: {first}") from None
        time.sleep(min(0.5, 0.01 * 2**attempt))
    raise AssertionError("unreachable")


def _retryable(exc: DBAPIError) -> bool:
    """Return whether a database error is contention worth retrying (busy SQLite, PostgreSQL serialization)."""
    if isinstance(exc, OperationalError) and "locked" in str(exc.orig).lower():
        return True
    return getattr(exc.orig, "sqlstate", None) in RETRY_SQLSTATES
