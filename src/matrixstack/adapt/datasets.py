"""A tenant's datasets: add one (a validated file and its row, all or nothing), list, find, remove, and
`load_split`, the rows a tune job trains and evaluates on.

Ownership: `tenant` names the owner (a matrix tenant, created on first use by `add_dataset`); None is the operator,
whose own datasets have no owner. A tenant sees only its own datasets: another tenant's is "not found" for it, the
same `UnknownDataset` error as a name nobody has, so a name's existence does not leak (as the portal does with
private catalog entries). `list_datasets(session, None)` is the operator's view: every dataset, with its owner.

Split: `split` F (0 < F < 1) keeps round(rows x F) rows to train on (at least one, and at least one held out) and
holds out the rest; which rows are held out is decided by a seeded shuffle (`random.Random(seed)`) of the row
indices, and recorded (`DatasetRow.heldout`). Both splits keep the file's row order. No split: every row trains.

Units of work (`matrix.database`): `add_dataset` and `remove_dataset` take the `Database`, because they pair a
file with a row: the file is written inside the row's write transaction (idempotent, so a retried transaction
writes it again) and removed again when the transaction fails and no other row uses it; a file is removed inside
the transaction that deletes its last row. `list_datasets`, `find_dataset` and `load_split` take the caller's
session and never commit.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from matrixstack.adapt.dataset_file import DatasetFile
from matrixstack.adapt.dataset_store import DatasetRow, dataset_path, write_dataset_file
from matrixstack.errors import UserError
from matrixstack.matrix.database import Database
from matrixstack.matrix.store import TenantRow, iso
from matrixstack.matrix.tenants import check_name, tenant_id

Split = Literal["train", "heldout"]
SPLITS = ("train", "heldout")
NOBODY = -1  # the owner id of a tenant that does not exist: it owns nothing


class UnknownDataset(UserError):
    """A dataset name the caller has none of (or one of another tenant's)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What `dataset list` and `dataset show` tell about a dataset (not its rows)."""

    name: str
    tenant: str | None
    shape: str
    rows: int
    train_rows: int
    heldout_rows: int
    split: float | None
    seed: int
    sha256: str
    size_bytes: int
    created: str

    def view(self) -> dict[str, Any]:
        """Return the info as a JSON-ready dict."""
        return asdict(self)


def heldout_indices(rows: int, split: float | None, seed: int) -> list[int]:
    """Return the sorted 0-based indices of the rows held out when `split` of `rows` rows train (none when `split`
    is None); UserError when `split` is not in (0, 1) or leaves one side empty."""
    if split is None:
        return []
    if not 0.0 < split < 1.0:
        raise UserError(f"--split {split:g} must be a train fraction between 0 and 1 (e.g. 0.9: 10% held out)")
    train = round(rows * split)
    if not 0 < train < rows:
        raise UserError(
            f"--split {split:g} of {rows} row(s) leaves {'no' if train == 0 else 'no held-out'} row to "
            f"{'train on' if train == 0 else 'evaluate on'}; use a split nearer 0.5 or more rows"
        )
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return sorted(order[train:])


def add_dataset(
    database: Database, name: str, data: DatasetFile, tenant: str | None, split: float | None = None, seed: int = 0
) -> DatasetInfo:
    """Store a validated dataset under `name` for `tenant` (None: the operator), with its held-out split; return its
    info. UserError for a bad name, tenant or split, a name the owner has already, or a file that cannot be
    written; then nothing is stored (no row, and no file no other dataset uses)."""
    check_name(name, "dataset")
    if tenant is not None:
        check_name(tenant, "tenant")
    heldout = heldout_indices(len(data.rows), split, seed)
    sha256 = data.sha256
    created_file: list[bool] = []

    def op(session: Session) -> DatasetInfo:
        owner = None if tenant is None else tenant_id(session, tenant)
        if _row(session, name, owner) is not None:
            raise UserError(
                f"{_what(name, tenant)} exists already; pick another --name or remove it first "
                f"(`matrixstack dataset remove {name}{_tenant_flag(tenant)}`)"
            )
        row = DatasetRow(
            name=name, owner_tenant_id=owner, shape=data.shape, rows=len(data.rows), split=split, seed=seed,
            heldout=heldout, sha256=sha256, size_bytes=len(data.canonical),
        )  # fmt: skip
        session.add(row)
        session.flush()
        try:
            created_file.append(write_dataset_file(sha256, data.canonical)[1])
        except OSError as exc:
            raise UserError(f"cannot write {dataset_path(sha256)}: {exc.strerror}; check the data directory") from None
        return _info(row, tenant)

    try:
        return database.write(op)
    except BaseException:
        if any(created_file) and not database.read(lambda session: _used(session, sha256)):
            dataset_path(sha256).unlink(missing_ok=True)
        raise


def remove_dataset(database: Database, name: str, tenant: str | None) -> DatasetInfo:
    """Remove the dataset `name` of `tenant` (None: the operator's) and its file when no other dataset uses it;
    return what it was. UnknownDataset when the caller has no dataset of that name."""

    def op(session: Session) -> DatasetInfo:
        row = _visible_row(session, name, tenant)
        info = _info(row, tenant)
        session.delete(row)
        session.flush()
        if not _used(session, row.sha256):
            dataset_path(row.sha256).unlink(missing_ok=True)
        return info

    return database.write(op)


def list_datasets(session: Session, tenant: str | None) -> list[DatasetInfo]:
    """Return `tenant`'s datasets by name; every dataset (operator's first, then by owner) when `tenant` is None."""
    query = select(DatasetRow, TenantRow.name).outerjoin(TenantRow, DatasetRow.owner_tenant_id == TenantRow.id)
    if tenant is not None:
        query = query.where(DatasetRow.owner_tenant_id == _owner_id(session, tenant))
    query = query.order_by(TenantRow.name.is_not(None), TenantRow.name, DatasetRow.name)
    return [_info(row, owner) for row, owner in session.execute(query)]


def find_dataset(session: Session, name: str, tenant: str | None) -> DatasetInfo:
    """Return the info of `tenant`'s dataset `name` (None: the operator's); UnknownDataset when it has none."""
    return _info(_visible_row(session, name, tenant), tenant)


def load_split(session: Session, name: str, tenant: str | None, split: Split) -> list[dict[str, Any]]:
    """Return the validated rows of one split of `tenant`'s dataset `name` (None: the operator's), in file order:
    each a dict in one of the two shapes (`{"messages": [...]}` or `{"prompt", "completion"}`); "heldout" is empty
    when the dataset has no split. UnknownDataset when the caller has no dataset of that name (another tenant's
    included); UserError when `split` is not train or heldout, or the stored file is gone or was changed."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    row = _visible_row(session, name, tenant)
    rows = read_stored_rows(row.sha256, _what(name, tenant))
    heldout = set(row.heldout)
    return [r for i, r in enumerate(rows) if (i in heldout) == (split == "heldout")]


def read_stored_rows(sha256: str, what: str) -> list[dict[str, Any]]:
    """Return the rows of the stored file of `sha256` (the dataset `what`); UserError when the file is missing or
    its bytes no longer hash to `sha256`."""
    path = dataset_path(sha256)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"the file of {what} cannot be read ({path}: {exc.strerror}); remove the dataset and add it again"
        ) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"the file of {what} ({path}) was changed since it was added; remove the dataset and add it again"
        )
    return [json.loads(line) for line in data.decode().splitlines()]


def _visible_row(session: Session, name: str, tenant: str | None) -> DatasetRow:
    """Return the row of `tenant`'s dataset `name`; UnknownDataset when there is none it may see."""
    owner = None if tenant is None else _owner_id(session, tenant)
    row = _row(session, name, owner)
    if row is None:
        raise UnknownDataset(f"no {_what(name, tenant)}; see `matrixstack dataset list{_tenant_flag(tenant)}`")
    return row


def _row(session: Session, name: str, owner: int | None) -> DatasetRow | None:
    """Return the dataset row `name` of the owner id `owner` (None: the operator), or None."""
    owned = DatasetRow.owner_tenant_id.is_(None) if owner is None else DatasetRow.owner_tenant_id == owner
    return session.scalars(select(DatasetRow).where(DatasetRow.name == name, owned)).first()


def _owner_id(session: Session, tenant: str) -> int:
    """Return the id of an existing tenant, NOBODY when there is no such tenant (it owns nothing)."""
    check_name(tenant, "tenant")
    found = session.scalars(select(TenantRow.id).where(TenantRow.name == tenant)).first()
    return NOBODY if found is None else found


def _used(session: Session, sha256: str) -> bool:
    """Return whether any dataset row uses the file of `sha256`."""
    return session.scalar(select(func.count()).where(DatasetRow.sha256 == sha256)) > 0


def _info(row: DatasetRow, tenant: str | None) -> DatasetInfo:
    """Return the DatasetInfo of a row whose owner's name is `tenant`."""
    return DatasetInfo(
        name=row.name, tenant=tenant, shape=row.shape, rows=row.rows, train_rows=row.rows - len(row.heldout),
        heldout_rows=len(row.heldout), split=row.split, seed=row.seed, sha256=row.sha256, size_bytes=row.size_bytes,
        created=iso(row.created_at),
    )  # fmt: skip


def _what(name: str, tenant: str | None) -> str:
    """Return how an error names a dataset: `dataset 'N'`, with `of tenant 'T'` when a tenant is given."""
    return f"dataset {name!r}" + ("" if tenant is None else f" of tenant {tenant!r}")


def _tenant_flag(tenant: str | None) -> str:
    """Return the `--tenant T` a suggested command needs, or nothing for the operator."""
    return "" if tenant is None else f" --tenant {tenant}"
