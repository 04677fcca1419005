"""Fault injection on `matrixstack up` as a user runs it (a subprocess of the embedded default shape: tiny-moe with
two EP workers on two CPU cores, `--port 0`, the data directory in a tmp folder), on SQLite and on PostgreSQL
(`--db`), called with the official `openai` client while `kill -9` hits, in this order: an EP worker, the engine's
main process in the middle of streams (the supervisor starts it again), and `up` itself, which is then started
again on the same database.

After each fault, once the deployment serves again, the invariants:
- usage: one usage row per request sent (while `up` lived), and the rows with status 200 are exactly the requests
  the client saw complete (a full JSON answer, or a stream that ended with its usage); after `kill -9` of `up`,
  every request the client saw complete has its row (the portal writes it before the answer's last piece), and at
  most one more per client (a row written, the kill before its answer left);
- no orphan: no process of a killed engine's group, and after `kill -9` of `up` none of the processes it started
  (found by a variable only their environment carries, RUN_MARKER, in /proc/PID/environ);
- no half slice: every live slice of the pool belongs to a registered deployment and every deployment's slice is
  live, with exactly its devices held;
- the database opens and passes its integrity check (SQLite's `PRAGMA integrity_check` and `foreign_key_check`;
  on PostgreSQL every table read through).
A stream cut by a fault ends with an error the client sees (never a hang, never a silent short answer).
Whatever a test leaves running is killed at the end of the module (by the same marker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from conftest import fresh_database_url
from sqlalchemy import func, inspect, select, text
from test_stack_up import UpRun, engines_of, processes, zombies_of

from matrixstack.matrix.store import PoolRow, SliceDeviceRow, SliceRow
from matrixstack.portal.store import DeploymentRow, UsageRow, open_portal_database
from matrixstack.stack.supervise import group_members

pytestmark = pytest.mark.slow

ENTRY = "tiny-moe"  # the default shape's L0, on the EP deployment
DEPLOYMENT = "tiny-moe"
EP_WORKERS = 2
RUN_MARKER = "MATRIXSTACK_RELIABILITY_RUN"  # set in `up`'s environment only; every process it starts inherits it
RECOVER_S = 180.0  # deadline for a deployment to serve again: a failure guard, never a timing assertion
GONE_S = 30.0  # deadline for killed processes to disappear
STOP_S = 60.0  # deadline for `up` to stop on Ctrl-C at the end
USAGE_SETTLE_S = 30.0  # the portal writes usage in batches
REQUEST_TIMEOUT_S = 120.0
LOAD_REQUESTS = 8
STREAM_TOKENS = 96  # long enough for a stream to be cut in its middle
POLL_S = 0.2
KILL_UP_LOAD = (False, False, True, True)  # clients sending back to back when `up` is killed: streamed or not


# ---- the processes ------------------------------------------------------------------------------------------


def marked(marker: str) -> list[int]:
    """Return the live processes whose environment carries RUN_MARKER=`marker` (zombies not)."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for pid, (_, _, state) in processes().items():
        if state in ("Z", "X") or pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of `pids` that still lives."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gone_within(pids_fn, deadline_s: float = GONE_S) -> list[int]:
    """Return what `pids_fn()` still returns after it returned nothing or `deadline_s` passed."""
    deadline = time.monotonic() + deadline_s
    left = pids_fn()
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = pids_fn()
    return left


# ---- the stack under test -----------------------------------------------------------------------------------


@dataclass
class Stack:
    """`up` on one database, and what the client saw: requests sent and completed over all runs."""

    home: Path
    db_url: str
    markers: list[str] = field(default_factory=list)
    runs: list[UpRun] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    sent: int = 0
    completed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> UpRun:
        """Start `up` (again) on the stack's database with a new marker; return it once it serves."""
        marker = uuid.uuid4().hex
        run = UpRun(self.home, len(self.runs) + 1, args=("--db", self.db_url), env={RUN_MARKER: marker})
        self.markers.append(marker)
        self.runs.append(run)
        self.keys = self.keys or run.keys
        return run

    @property
    def up(self) -> UpRun:
        return self.runs[-1]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.up.base_url, api_key=self.keys["default"], max_retries=0, timeout=REQUEST_TIMEOUT_S
        )

    def engine(self) -> int:
        """Return the pid (and process group) of the deployment's engine, once there is exactly one."""
        deadline = time.monotonic() + RECOVER_S
        while True:
            found = engines_of(self.up.process.pid)
            if len(found) == 1:
                return found[0]
            assert time.monotonic() < deadline, f"engines of `up`: {found}\n{self.up.output()}"
            time.sleep(POLL_S)

    def workers(self) -> list[int]:
        """Return the EP workers of the engine now (its group, less itself and the forkserver)."""
        engine = self.engine()
        return [pid for pid in group_members(engine) if pid != engine and processes()[pid][0] != engine]

    def request(self, stream: bool, max_tokens: int = 8) -> str:
        """Send one completion; count it as sent, and as completed when the client saw it whole. Return "ok", or
        what the client saw: "error: ..." (an error status or a stream's error event), "cut: ..." (the connection
        broke) or "short: ..." (a stream that ended without its usage or tokens: a silent cut)."""
        with self.lock:
            self.sent += 1
        body = {"model": ENTRY, "prompt": "The matrix is", "max_tokens": max_tokens, "temperature": 0}
        try:
            with self.client() as client:
                if stream:
                    chunks = list(client.completions.create(**body, stream=True, extra_body={"ignore_eos": True}))
                    if not chunks or chunks[-1].usage is None or chunks[-1].usage.completion_tokens != max_tokens:
                        return f"short: {chunks[-1:]}"
                else:
                    reply = client.completions.create(**body, extra_body={"ignore_eos": True})
                    if reply.usage is None or reply.usage.completion_tokens != max_tokens:
                        return f"short: {reply}"
        except (openai.APIConnectionError, httpx.HTTPError) as exc:
            return f"cut: {type(exc).__name__}: {exc}"
        except openai.APIError as exc:
            return f"error: {type(exc).__name__}: {exc}"
        with self.lock:
            self.completed += 1
        return "ok"

    def load(self, n: int, stream: bool, max_tokens: int = 8) -> list[str]:
        """Send `n` requests at once; return their outcomes."""
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: self.request(stream, max_tokens), range(n)))

    def serves_again(self) -> None:
        """Return once a request completes (the deployment recovered); fail after RECOVER_S."""
        deadline = time.monotonic() + RECOVER_S
        while (outcome := self.request(stream=False)) != "ok":
            assert time.monotonic() < deadline, f"no recovery within {RECOVER_S:.0f} s: {outcome}\n{self.up.output()}"
            time.sleep(1.0)

    def usage_rows(self, expected: int | None) -> list[int]:
        """Return the status of every usage row once `expected` rows are written (None: once their number holds
        still for a second) or USAGE_SETTLE_S passed."""
        db = open_portal_database(self.db_url)
        try:
            deadline = time.monotonic() + USAGE_SETTLE_S
            last = None
            while True:
                rows = db.read(lambda s: list(s.scalars(select(UsageRow.status_code))))
                if (len(rows) == expected if expected is not None else rows == last) or time.monotonic() > deadline:
                    return rows
                last = rows
                time.sleep(1.0 if expected is None else POLL_S)
        finally:
            db.close()

    def check_invariants(self, rows_per_request: bool = True) -> None:
        """Assert the module docstring's invariants on usage, slices and the database."""
        rows = self.usage_rows(self.sent if rows_per_request else None)
        billed = rows.count(200)
        if rows_per_request:
            assert len(rows) == self.sent, f"{len(rows)} usage rows for {self.sent} requests sent"
            assert billed == self.completed, f"{billed} rows of status 200, {self.completed} completed"
        else:  # a kill of the portal: every completed request billed; one in flight per client may be billed
            # too (its row written, its answer's last bytes not sent when the kill came), never more
            assert self.completed <= billed <= self.completed + len(KILL_UP_LOAD), (billed, self.completed)
        check_database(self.db_url)
        check_slices(self.db_url)


def check_database(db_url: str) -> None:
    """Assert that the database opens and passes its integrity check (see the module docstring)."""
    db = open_portal_database(db_url)
    try:
        with db.engine.connect() as conn:
            if db.engine.dialect.name == "sqlite":
                assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
                assert conn.execute(text("PRAGMA foreign_key_check")).fetchall() == []
            for table in inspect(conn).get_table_names():
                conn.execute(text(f'SELECT * FROM "{table}"')).fetchall()
    finally:
        db.close()


def check_slices(db_url: str) -> None:
    """Assert that no slice is half there: live slices and deployments' slices are the same, each with its
    devices."""

    def read(session):
        live = {
            (pool, slice_id): devices
            for pool, slice_id, devices in session.execute(
                select(PoolRow.name, SliceRow.id, SliceRow.device_count)
                .join(PoolRow, PoolRow.id == SliceRow.pool_id)
                .where(SliceRow.state != "freed")
            )
        }
        held = dict(
            session.execute(select(SliceDeviceRow.slice_id, func.count()).group_by(SliceDeviceRow.slice_id)).all()
        )
        deployed = {
            (d.pool, d.slice_id)
            for d in session.scalars(select(DeploymentRow).where(DeploymentRow.slice_id.is_not(None)))
        }
        return live, held, deployed

    db = open_portal_database(db_url)
    try:
        live, held, deployed = db.read(read)
    finally:
        db.close()
    assert set(live) == deployed, f"live slices {sorted(live)}, deployments' slices {sorted(deployed)}"
    assert held == {slice_id: devices for (_, slice_id), devices in live.items()}, (held, live)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, tmp_path_factory):
    """`up` of the default shape on a fresh database of each kind, for the module; everything it (or a restart)
    started is killed at the end."""
    home = tmp_path_factory.mktemp("home")
    db_url = fresh_database_url(request, request.param, home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIXSTACK_HOME", str(home))
        mp.delenv("MATRIXSTACK_DB", raising=False)
        s = Stack(home, db_url)
        try:
            s.start()
            yield s
        finally:
            for run in s.runs:
                if run.process.poll() is None:
                    run.process.send_signal(signal.SIGINT)
            for run in s.runs:
                try:
                    run.process.wait(timeout=STOP_S)
                except subprocess.TimeoutExpired:
                    run.process.kill()
            for marker in s.markers:
                kill_all(marked(marker))


# ---- the faults ---------------------------------------------------------------------------------------------


def test_kill_9_of_an_ep_worker_fails_at_most_its_requests_and_recovers(stack):
    stack.serves_again()
    workers = stack.workers()
    assert len(workers) >= EP_WORKERS, stack.up.output()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(stack.load, LOAD_REQUESTS, False, 32)
        time.sleep(0.5)
        os.kill(workers[0], signal.SIGKILL)
        load.result()
    stack.serves_again()
    assert workers[0] not in marked(stack.markers[-1])
    assert len(stack.workers()) >= EP_WORKERS
    stack.check_invariants()


def test_kill_9_of_the_engine_mid_stream_ends_each_stream_and_the_engine_restarts(stack):
    stack.serves_again()
    engine = stack.engine()
    with ThreadPoolExecutor(LOAD_REQUESTS) as pool:
        streams = [pool.submit(stack.request, True, STREAM_TOKENS) for _ in range(LOAD_REQUESTS)]
        time.sleep(1.0)  # the streams are under way
        os.kill(engine, signal.SIGKILL)
        outcomes = [s.result(timeout=REQUEST_TIMEOUT_S + 30) for s in streams]  # none hangs
    cut = [o for o in outcomes if o != "ok"]
    assert cut, outcomes  # the kill came in the middle: some streams were cut
    assert all(o.startswith("error: ") for o in cut), outcomes  # an error status or event, not a broken connection
    assert not gone_within(lambda: group_members(engine)), "the killed engine's group lives on"
    stack.serves_again()
    assert stack.engine() != engine and not zombies_of(stack.up.process.pid)
    assert len(stack.workers()) >= EP_WORKERS
    db = open_portal_database(stack.db_url)
    try:
        status = db.read(lambda s: s.scalar(select(DeploymentRow.status).where(DeploymentRow.name == DEPLOYMENT)))
    finally:
        db.close()
    assert status == "running"
    stack.check_invariants()


def test_kill_9_of_up_leaves_no_process_behind(stack):
    stack.serves_again()
    killed = stack.up

    def until_cut(stream: bool) -> None:  # requests back to back: some complete just before the kill
        while not stack.request(stream, max_tokens=32 if stream else 4).startswith("cut: "):
            pass

    with ThreadPoolExecutor(len(KILL_UP_LOAD)) as pool:
        loads = [pool.submit(until_cut, stream) for stream in KILL_UP_LOAD]
        time.sleep(2.0)
        killed.process.kill()  # kill -9
        killed.process.wait()
        for load in loads:
            load.result(timeout=REQUEST_TIMEOUT_S + 30)
    left = gone_within(lambda: marked(stack.markers[-1]))
    assert not left, f"processes of the killed `up` still run: {left}"
    check_database(stack.db_url)


def test_up_after_kill_9_serves_with_one_engine_and_every_invariant_holds(stack):
    if stack.up.process.poll() is None:  # run on its own: kill -9 the running `up` first
        stack.up.process.kill()
        stack.up.process.wait()
    killed_marker = stack.markers[-1]
    run = stack.start()
    assert run.keys == {}, run.output()  # the same database: the old keys
    assert not marked(killed_marker), "the restarted `up` left the killed one's processes running"
    assert len(run.engine_pids) == 1 and len(stack.workers()) == EP_WORKERS, run.output()
    assert [stack.request(stream=s) for s in (False, True)] == ["ok", "ok"]
    stack.check_invariants(rows_per_request=False)  # requests in flight at the kill may have left no row
    assert run.interrupt() == 0, run.output()  # and Ctrl-C stops it with everything it started
    assert not gone_within(lambda: marked(stack.markers[-1]))
