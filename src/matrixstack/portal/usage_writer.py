"""The usage batch writer: requests hand their usage records to a queue; a thread writes them in batches.

`UsageWriter(write_fn)` runs one daemon thread that takes everything queued since its last round and calls
`write_fn(records)` (`usage_service.record_usage` in one unit of work for the batch). Two ways in:
- `submit(record)` never blocks, never touches the database and wakes no thread: the record goes with the next
  round, at most `interval_s` (~200 ms) away (a refused or failed request's record);
- `commit(record)` (on an event loop) queues it, wakes the writer and returns a future of that loop done once the
  record's batch is written: a group commit. The gateway awaits it before a completed request's answer (or a
  stream's last piece) leaves, so a request the client saw complete is billed even when the portal is killed
  right after (`kill -9` of `up`); requests finishing together share one transaction. A batch whose write fails is
  kept and retried on the next round (the error is logged), its futures left waiting (the gateway waits
  `COMMIT_WAIT_S` at most, then answers anyway).
`stop()` writes everything still queued before it returns and releases every waiting future, so a clean stop
loses no record. `flush()` starts a round at once and returns once every record submitted before the call is
written (tests, shutdown hooks).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

LOG = logging.getLogger("matrixstack.portal.usage")
INTERVAL_S = 0.2
STOP_RETRIES = 5  # attempts at the last batch on stop before giving up on a database that keeps failing
RETRY_PAUSE_S = 0.2
COMMIT_WAIT_S = 5.0  # how long a completed request's answer waits for its usage row before it goes anyway


class _Waited:
    """A record queued by `commit`, with the future to set once it is written."""

    __slots__ = ("record", "loop", "done")

    def __init__(self, record: Any, loop: asyncio.AbstractEventLoop, done: asyncio.Future):
        self.record, self.loop, self.done = record, loop, done


def _release(futures: list[asyncio.Future]) -> None:
    """Mark each future done (on its loop's thread)."""
    for future in futures:
        if not future.done():
            future.set_result(None)


class UsageWriter:
    """Writes usage records in batches from a background thread (see the module docstring)."""

    def __init__(self, write_fn: Callable[[list[Any]], None], interval_s: float = INTERVAL_S):
        self._write_fn = write_fn
        self._interval_s = interval_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # nobody blocks on it: a put wakes no thread
        self._wake = threading.Event()  # set by flush() and stop() to start a round at once
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._round_done = threading.Condition()
        self._rounds = 0
        self._batch: list[Any] = []  # drained, not written yet (kept across rounds while writes fail)
        self._waiting: list[_Waited] = []  # the `commit`s among them
        self.written = 0  # records written so far
        self.failures = 0  # failed batch writes so far (each retried)

    def start(self) -> UsageWriter:
        """Start the writer thread (once); return self."""
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="portal-usage-writer", daemon=True)
                self._thread.start()
        return self

    def submit(self, record: Any) -> None:
        """Queue one usage record for the next batch (never blocks, wakes no thread)."""
        self._queue.put(record)

    def commit(self, record: Any) -> asyncio.Future:
        """Queue one usage record, wake the writer, and return a future of the running loop done once it is
        written (see the module docstring)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.put(_Waited(record, loop, done))
        self._wake.set()
        return done

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Return True once every record submitted before this call is written (False on timeout or failure)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return self._queue.empty()
        with self._round_done:
            # A round that started before this call may have missed the latest records: wait for two.
            target = self._rounds + 2
            self._wake.set()
            ok = self._round_done.wait_for(lambda: self._rounds >= target or not thread.is_alive(), timeout_s)
        return ok and not self._batch

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write every queued record, then stop the thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout_s)

    @property
    def pending(self) -> int:
        """Return roughly how many records wait to be written."""
        return self._queue.qsize() + len(self._batch)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            stopping = self._stopping
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Waited):
                    self._waiting.append(item)
                    item = item.record
                self._batch.append(item)
            if self._batch and self._write(self._batch, attempts=STOP_RETRIES if stopping else 1):
                self._batch = []
            if self._waiting and (not self._batch or stopping):
                self._release_waiting()
            with self._round_done:
                self._rounds += 1
                self._round_done.notify_all()
            if stopping:
                return

    def _release_waiting(self) -> None:
        """Set the futures of the records written (or given up on at stop), one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for waited in self._waiting:
            by_loop.setdefault(waited.loop, []).append(waited.done)
        self._waiting = []
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_release, futures)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def _write(self, batch: list[Any], attempts: int) -> bool:
        """Return True when `batch` was written (retrying up to `attempts` times)."""
        for attempt in range(attempts):
            try:
                self._write_fn(list(batch))
            except Exception:
                self.failures += 1
                LOG.exception("writing %d usage records failed (attempt %d of %d)", len(batch), attempt + 1, attempts)
                if attempt + 1 < attempts:
                    time.sleep(RETRY_PAUSE_S)
                continue
            self.written += len(batch)
            return True
        if attempts > 1:
            LOG.error("gave up writing %d usage records on stop", len(batch))
        return False


async def written(done: asyncio.Future | None, timeout_s: float = COMMIT_WAIT_S) -> bool:
    """Return True once `done` (a `commit` future; None: nothing to wait for) is set, False after `timeout_s`."""
    if done is None:
        return True
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        return False
    return True
