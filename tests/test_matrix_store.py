"""Matrix layer, persisted: the services on SQLite and on a real PostgreSQL server, with real processes.

The PostgreSQL half runs when a server can be started here: `initdb` and `pg_ctl` on PATH or in Debian's
/usr/lib/postgresql/*/bin (`.ci/run` installs the `postgresql` package). conftest.py's `db_url` gives each test a
fresh database on one throwaway server for the whole session (shared with the portal's tests).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.matrix.database import Database, open_database
from matrixstack.matrix.events import list_events
from matrixstack.matrix.failures import fail_device, parse_device, repair_device
from matrixstack.matrix.pools import create_pool, list_pools, show_pool
from matrixstack.matrix.simulate import resize_pod
from matrixstack.matrix.slices import alloc_slice, free_slice, resize_slice
from matrixstack.matrix.spec import SliceConstraints, SliceRequest
from matrixstack.matrix.store import EventRow, SliceDeviceRow, SliceRow

CM384 = load_fabric("cloudmatrix384")
SMALL = resize_pod(CM384, 2)  # 16 devices: easy to fill


@pytest.fixture
def database(db_url):
    svc = open_database(db_url)
    yield svc
    svc.close()


def _request(devices: int, **constraints) -> SliceRequest:
    return SliceRequest(devices=devices, constraints=SliceConstraints(**constraints))


def test_state_survives_a_new_engine(db_url):
    first = open_database(db_url)
    first.write(lambda session: create_pool(session, "prod", [CM384]))
    kept = first.write(lambda session: alloc_slice(session, "prod", "alice", _request(12)))
    first.write(lambda session: alloc_slice(session, "prod", "bob", _request(3), policy="server"))
    first.write(lambda session: fail_device(session, "prod", (0, 300), "link down"))
    first.close()
    second = open_database(db_url)
    view = second.read(lambda session: show_pool(session, "prod"))
    assert view.stats["allocated"] == 20 and view.stats["failed"] == 1
    assert [s.id for s in view.slices] == [kept.id, kept.id + 1]
    assert view.slices[0].devices == kept.devices and view.slices[0].tenant == "alice"
    assert view.tenants == {"alice": 12, "bob": 8}
    assert [e["kind"] for e in second.read(lambda session: list_events(session, "prod"))] == [
        "create",
        "alloc",
        "alloc",
        "fail",
    ]
    assert second.read(list_pools)[0] | {"created_at": None} == {
        "pool": "prod",
        "fabrics": ["cloudmatrix384"],
        "devices": 384,
        "allocated": 20,
        "failed": 1,
        "slices": 2,
        "created_at": None,
    }
    second.close()


def test_a_tenant_can_neither_see_free_nor_resize_another_tenants_slice(database):
    database.write(lambda session: create_pool(session, "p", [CM384]))
    alice = database.write(lambda session: alloc_slice(session, "p", "alice", _request(4)))
    bob = database.write(lambda session: alloc_slice(session, "p", "bob", _request(2)))
    view = database.read(lambda session: show_pool(session, "p", tenant="bob"))
    assert [s.id for s in view.slices] == [bob.id] and view.tenants is None
    assert view.owners[0][alice.devices[0]] < 0 and view.owners[0][bob.devices[0]] == bob.id
    with pytest.raises(UserError, match=f"no live slice {alice.id} of tenant 'bob'"):
        database.write(lambda session: free_slice(session, alice.id, tenant="bob"))
    with pytest.raises(UserError, match=f"no live slice {alice.id} of tenant 'bob'"):
        database.write(lambda session: resize_slice(session, alice.id, 8, tenant="bob"))
    assert [e["slice"] for e in database.read(lambda session: list_events(session, "p", tenant="bob"))] == [bob.id]
    freed = database.write(lambda session: free_slice(session, alice.id, tenant="alice"))
    assert freed.state == "freed" and freed.devices == alice.devices
    with pytest.raises(UserError, match=f"no live slice {alice.id}"):
        database.write(lambda session: free_slice(session, alice.id))
    assert database.read(lambda session: show_pool(session, "p")).stats["allocated"] == 2


def test_fail_replaces_from_the_same_domain_or_degrades_then_repair_heals(database):
    database.write(lambda session: create_pool(session, "small", [SMALL]))
    a = database.write(lambda session: alloc_slice(session, "small", "alice", _request(6)))
    b = database.write(lambda session: alloc_slice(session, "small", "bob", _request(8), policy="server"))
    replaced = database.write(lambda session: fail_device(session, "small", (0, a.devices[0]), "xid 79"))
    assert replaced["action"] == "replaced" and replaced["slice"] == a.id and len(replaced["replacement"]) == 1
    now = database.read(lambda session: show_pool(session, "small"))
    by_id = {s.id: s for s in now.slices}
    assert len(by_id[a.id].devices) == 6 and a.devices[0] not in by_id[a.id].devices
    # fill the last free device, then fail one more: no spare is left, the slice is degraded with the reason
    database.write(lambda session: alloc_slice(session, "small", "carol", _request(1)))
    degraded = database.write(lambda session: fail_device(session, "small", (0, b.devices[3]), "ECC"))
    assert degraded["action"] == "degraded" and "no free whole node" in degraded["reason"]
    slice_b = next(s for s in database.read(lambda session: show_pool(session, "small")).slices if s.id == b.id)
    assert slice_b.state == "degraded" and len(slice_b.devices) == 7 and "ECC" not in slice_b.reason
    with pytest.raises(UserError, match="failed already"):
        database.write(lambda session: fail_device(session, "small", (0, b.devices[3])))
    repaired = database.write(lambda session: repair_device(session, "small", (0, b.devices[3])))
    assert repaired["healed_slices"] == [b.id]
    slice_b = next(s for s in database.read(lambda session: show_pool(session, "small")).slices if s.id == b.id)
    assert slice_b.state == "active" and slice_b.devices == b.devices
    with pytest.raises(UserError, match="is not failed"):
        database.write(lambda session: repair_device(session, "small", (0, b.devices[3])))
    kinds = [e["kind"] for e in database.read(lambda session: list_events(session, "small"))]
    assert kinds.count("replace") == 1 and kinds.count("degrade") == 1 and kinds[-2:] == ["repair", "heal"]


def test_a_whole_node_slice_moves_to_a_whole_free_node(database):
    database.write(lambda session: create_pool(session, "p", [CM384]))
    s = database.write(
        lambda session: alloc_slice(session, "p", "alice", SliceRequest(devices=8, host_cpus=2), policy="server")
    )
    result = database.write(lambda session: fail_device(session, "p", (0, s.devices[0])))
    assert result["action"] == "replaced" and len(result["replacement"]) == 8
    moved = database.read(lambda session: show_pool(session, "p")).slices[0]
    assert moved.nodes == (1,) and moved.hosts == ((1, 4, 2048.0),)
    assert database.read(lambda session: show_pool(session, "p")).stats["free"] == 384 - 8 - 1


def test_a_degraded_whole_node_slice_heals_when_a_node_is_freed(database):
    database.write(lambda session: create_pool(session, "small", [SMALL]))
    server = database.write(lambda session: alloc_slice(session, "small", "alice", _request(8), policy="server"))
    other = database.write(lambda session: alloc_slice(session, "small", "bob", _request(8)))
    assert database.write(lambda session: fail_device(session, "small", (0, server.devices[0])))["action"] == "degraded"
    database.write(lambda session: free_slice(session, other.id, tenant="bob"))
    healed = next(s for s in database.read(lambda session: show_pool(session, "small")).slices if s.id == server.id)
    assert healed.state == "active" and healed.nodes == other.nodes and len(healed.devices) == 8
    assert [e["kind"] for e in database.read(lambda session: list_events(session, "small"))][-2:] == ["free", "heal"]


def test_resize_grows_near_the_slice_and_shrinks_to_whole_nodes(database):
    database.write(lambda session: create_pool(session, "p", [CM384]))
    s = database.write(lambda session: alloc_slice(session, "p", "alice", _request(6)))
    grown = database.write(lambda session: resize_slice(session, s.id, 12, tenant="alice"))
    assert set(s.devices) < set(grown.devices) and len(grown.nodes) == 2
    shrunk = database.write(lambda session: resize_slice(session, s.id, 8, tenant="alice"))
    assert len(shrunk.devices) == 8 and shrunk.nodes == (0,)
    whole = database.write(lambda session: alloc_slice(session, "p", "bob", _request(20), policy="server"))
    assert len(whole.devices) == 24
    assert len(database.write(lambda session: resize_slice(session, whole.id, 9)).devices) == 16
    with pytest.raises(UserError, match="cannot grow slice"):
        database.write(lambda session: resize_slice(session, whole.id, 8 * 60))


def test_constraints_and_errors_are_user_errors(database):
    database.write(lambda session: create_pool(session, "p", [CM384]))
    with pytest.raises(UserError, match="exists already"):
        database.write(lambda session: create_pool(session, "p", [CM384]))
    with pytest.raises(UserError, match="no pool named 'nope'.*matrix create --pool nope"):
        database.write(lambda session: alloc_slice(session, "nope", "alice", _request(1)))
    with pytest.raises(UserError, match="largest holds 8 devices"):
        database.write(lambda session: alloc_slice(session, "p", "alice", _request(9, max_tier=1)))
    with pytest.raises(UserError, match="unknown policy 'best'"):
        database.write(lambda session: alloc_slice(session, "p", "alice", _request(1), policy="best"))
    with pytest.raises(UserError, match="tenant name 'a b'"):
        database.write(lambda session: alloc_slice(session, "p", "a b", _request(1)))
    with pytest.raises(UserError, match="devices 0..383; got device 384"):
        database.write(lambda session: fail_device(session, "p", (0, 384)))
    database.write(lambda session: alloc_slice(session, "p", "alice", _request(380)))
    with pytest.raises(UserError, match="no room now for 5 devices"):
        database.write(lambda session: alloc_slice(session, "p", "alice", _request(5)))
    assert parse_device("1:17") == (1, 17) and parse_device("5") == (0, 5)
    with pytest.raises(UserError, match="is not F:D or D"):
        parse_device("a:b")
    with Session(database.engine) as session:
        assert session.scalar(select(func.count()).select_from(SliceRow)) == 1  # the refusals wrote nothing


def test_the_database_forbids_handing_out_a_device_twice(database):
    database.write(lambda session: create_pool(session, "p", [CM384]))
    s = database.write(lambda session: alloc_slice(session, "p", "alice", _request(2)))
    with Session(database.engine) as session, pytest.raises(IntegrityError):
        with session.begin():
            session.add(SliceDeviceRow(slice_id=s.id, pool_id=1, fabric_index=0, device=s.devices[0]))


def test_an_error_after_the_slice_rows_are_written_leaves_no_half_slice(database):
    database.write(lambda session: create_pool(session, "p", [CM384]))

    def explode(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO slice_devices"):
            raise RuntimeError("injected failure after the slice rows were inserted")

    event.listen(database.engine, "after_cursor_execute", explode)
    with pytest.raises(RuntimeError, match="injected"):
        database.write(lambda session: alloc_slice(session, "p", "alice", _request(4)))
    event.remove(database.engine, "after_cursor_execute", explode)
    _assert_empty(database)
    assert len(database.write(lambda session: alloc_slice(session, "p", "alice", _request(4))).devices) == 4


def _assert_empty(database: Database) -> None:
    with Session(database.engine) as session:
        assert session.scalar(select(func.count()).select_from(SliceRow)) == 0
        assert session.scalar(select(func.count()).select_from(SliceDeviceRow)) == 0
        assert [k for (k,) in session.execute(select(EventRow.kind))] == ["create"]
    assert database.read(lambda session: show_pool(session, "p")).stats["allocated"] == 0


# --- real processes -------------------------------------------------------------------------------------------


def _allocate_many(url: str, worker: int, count: int, barrier, results) -> None:
    """Child process: allocate `count` slices of 1-6 devices from pool 'p' as tenant t<worker>."""
    database = open_database(url)
    barrier.wait(timeout=60)
    got = []
    for k in range(count):
        try:
            request = _request(1 + (worker + k) % 6)
            info = database.write(partial(alloc_slice, pool="p", tenant=f"t{worker}", request=request))
        except UserError:
            continue
        got.append((info.id, info.devices))
    database.close()
    results.put((worker, got))


def _allocate_then_hang(url: str, marker: str) -> None:
    """Child process: start an allocation, signal once the slice rows are written, and hang before commit."""
    database = open_database(url)

    def hang(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO slice_devices"):
            Path(marker).write_text("inserted")
            time.sleep(120)

    event.listen(database.engine, "after_cursor_execute", hang)
    database.write(lambda session: alloc_slice(session, "p", "alice", _request(4)))


@pytest.mark.slow
def test_processes_allocating_at_once_never_share_a_device(db_url):
    setup = open_database(db_url)
    setup.write(lambda session: create_pool(session, "p", [CM384]))
    workers, each = 3, 40  # 3 x 40 slices of 3.5 devices on average: more than the 384 devices hold
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(db_url, w, each, barrier, results)) for w in range(workers)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    handed_out = [(0, d) for slices in got.values() for _, devices in slices for d in devices]
    assert len(handed_out) == len(set(handed_out))  # no device in two slices
    view = setup.read(lambda session: show_pool(session, "p"))
    assert view.stats["allocated"] == len(handed_out) and view.stats["slices"] == sum(len(s) for s in got.values())
    assert all(len(s) > 0 for s in got.values())  # they really ran side by side, each got some
    assert view.stats["allocated"] > 384 - 6  # the pool was filled until the smallest asks no longer fit
    setup.close()


@pytest.mark.slow
def test_a_process_killed_mid_allocation_leaves_no_half_slice(db_url, tmp_path):
    database = open_database(db_url)
    database.write(lambda session: create_pool(session, "p", [CM384]))
    marker = tmp_path / "inserted"
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_allocate_then_hang, args=(db_url, str(marker)))
    child.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the insert of its slice's devices"
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    _assert_empty(database)
    assert (
        len(database.write(lambda session: alloc_slice(session, "p", "bob", _request(4))).devices) == 4
    )  # the dead writer's lock is gone
    database.close()


def _count_rows(path: str) -> int:
    """Count the rows of table t from another process's connection, closed at once (the last one to close)."""
    import sqlite3

    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        connection.close()


def test_opening_the_database_again_in_one_process_keeps_its_writes(tmp_path):
    """A process that opens its SQLite database a second time (the local site records a restarted engine's status
    while the portal writes usage) must not drop the locks its connections hold: if it did, another process closing
    its last connection would delete the WAL the first connection still writes to, and those writes would vanish."""
    from sqlalchemy import text

    from matrixstack.matrix.store import open_engine

    path = str(tmp_path / "state.db")
    engine = open_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
        connection.execute(text("INSERT INTO t VALUES (1)"))
    open_engine(f"sqlite:///{path}").dispose()  # the second open, in this process
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        assert pool.apply(_count_rows, (path,)) == 1  # another process reads and closes
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (2)"))
        assert pool.apply(_count_rows, (path,)) == 2
    engine.dispose()
    assert _count_rows(path) == 2
