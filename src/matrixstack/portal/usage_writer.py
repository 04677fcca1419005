"""The usage batch writer: requests hand their usage records to a queue; a thread writes them in batches.

`UsageWriter(write_fn)` runs one daemon thread that wakes every `interval_s` (~200 ms), takes everything
`submit(record)` queued since and calls `write_fn(records)` (`usage_service.record_usage` in one unit of work for
the batch). `submit` never blocks, never touches the database and wakes no thread (the writer does not wait on the
queue), so the request path stays free of transactions and thread switches. A batch whose write fails is kept
and retried on the next round (the error is logged); `stop()` writes everything still queued before it returns,
so a clean stop loses no record. `flush()` starts a round at once and returns once every record submitted before
the call is written (tests, shutdown hooks).
"""

from __future__ import annotations

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
                    self._batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._batch and self._write(self._batch, attempts=STOP_RETRIES if stopping else 1):
                self._batch = []
            with self._round_done:
                self._rounds += 1
                self._round_done.notify_all()
            if stopping:
                return

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
