"""A backend's `api_key` at rest and in use: sealed or referenced when stored, opened only to call the backend.

The forms of `BackendSpec.api_key` in `catalog_entries.spec`:
- `enc:v1:...`: the key sealed with the data directory's key (`matrixstack.datakey`: a 0600 key file, or
  $MATRIXSTACK_SECRET_KEY where several machines share the database); what a key given in clear becomes before it
  is written (`sealed_backend`, called by `catalog_service.add_entry`, the one way entries are written);
- `env:NAME`: a reference to the environment variable NAME of the portal process, read when the portal first calls
  the backend and never stored (for keys kept in a secret manager or a k8s Secret);
- null: no key.
Given as "set" (what `EntrySpec.view()` shows instead of a key), a replaced entry keeps the key it has stored.

`seal_clear_keys(database)` is the upgrade: it seals each key an earlier version stored in clear, once, when the
database is opened; on SQLite with `secure_delete` and a truncating WAL checkpoint, so the clear bytes leave the
database file and its WAL, not only the row.

`backend_api_key(backend)` returns the clear key to send (UserError naming the variable or the key file when it
cannot), and tells the log scrubber (`portal.scrub`) to hide it. A key in clear there is a deployment's engine
secret, which `deployment_service.routed` derives for each call and nothing stores.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from matrixstack.datakey import decrypt, encrypt, is_sealed
from matrixstack.errors import UserError
from matrixstack.portal.scrub import remember_secret
from matrixstack.portal.spec import ENV_PREFIX, BackendSpec
from matrixstack.portal.store import CatalogEntryRow

if TYPE_CHECKING:
    from matrixstack.matrix.database import Database

KEEP_STORED = "set"  # an api_key given as shown by view(): keep the stored one


def stored_form(api_key: str | None, stored: str | None) -> str | None:
    """Return what to store for a backend given `api_key` (`stored`: the key its entry holds now): a sealed key or
    an `env:` reference as it is (a sealed one checked to open with this data key), "set" as `stored`, clear text
    sealed (`stored` itself when it seals the same key). UserError when a sealed key was sealed with another data
    key."""
    if api_key == KEEP_STORED:
        return stored
    if api_key is None or api_key.startswith(ENV_PREFIX):
        return api_key
    if is_sealed(api_key):
        decrypt(api_key)
        return api_key
    if stored is not None and is_sealed(stored):
        with contextlib.suppress(UserError):  # a stored key this data key cannot open is replaced
            if decrypt(stored) == api_key:
                return stored  # the same key given again: the row stays as it is
    return encrypt(api_key)


def sealed_backend(backend: BackendSpec, stored: str | None) -> BackendSpec:
    """Return `backend` with its api_key in its stored form (`stored_form`)."""
    return backend.model_copy(update={"api_key": stored_form(backend.api_key, stored)})


def backend_api_key(backend: BackendSpec) -> str | None:
    """Return the clear key to send to `backend` (None: none), remembered by the log scrubber; UserError when an
    `env:` variable is unset or the key was sealed with another data key."""
    value = backend.api_key
    if value is None:
        return None
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX) :]
        clear = os.environ.get(name)
        if not clear:
            raise UserError(f"the key of backend {backend.url} is ${name}, unset in the portal's environment")
    elif is_sealed(value):
        clear = decrypt(value)
    else:  # a deployment's engine secret, derived when the entry is routed (deployment_service.routed), never stored
        clear = value
    remember_secret(clear)
    return clear


def _clear_rows(session: Session) -> list[tuple[int, dict]]:
    """Return (id, spec) of the catalog entries whose backend api_key is stored in clear."""
    out = []
    for row_id, spec in session.execute(select(CatalogEntryRow.id, CatalogEntryRow.spec)):
        key = (spec.get("backend") or {}).get("api_key")
        if key is not None and not is_sealed(key) and not key.startswith(ENV_PREFIX):
            out.append((row_id, spec))
    return out


def _seal_rows(session: Session) -> int:
    """Seal the keys stored in clear (see the module docstring) and return how many there were."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    if sqlite:
        session.execute(text("PRAGMA secure_delete = ON"))  # the old cells are zeroed, not left in free space
    rows = _clear_rows(session)
    for row_id, spec in rows:
        backend = {**spec["backend"], "api_key": encrypt(spec["backend"]["api_key"])}
        session.get(CatalogEntryRow, row_id).spec = {**spec, "backend": backend}
    session.flush()
    if sqlite:
        session.execute(text("PRAGMA secure_delete = OFF"))
    return len(rows)


def seal_clear_keys(database: Database) -> int:
    """Seal every backend key an earlier version stored in clear and return how many it sealed (0, after a read,
    when there is none: the usual case writes nothing)."""
    if not database.read(_clear_rows):
        return 0
    sealed = database.write(_seal_rows)
    if database.engine.dialect.name == "sqlite":
        raw = database.engine.raw_connection()  # outside a transaction, which a checkpoint cannot run in
        try:
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the clear pages leave the WAL too
        finally:
            raw.close()
    return sealed
