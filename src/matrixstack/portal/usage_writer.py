"""The usage batch writer: requests hand their usage records to a queue; a thread writes them in batches.

`UsageWriter(write_fn)` runs one daemon thread that takes what `submit(record)` queued and calls
`write_fn(records)` (`PortalService.record_usage`: one transaction for the batch) every `interval_s` (~200 ms)
while records arrive. `submit` never blocks and never touches the database, so the request path stays free of
transactions. A batch whose write fails is kept and retried on the next round (the error is logged); `stop()`
writes everything still queued before it returns, so a clean stop loses no record. `flush()` returns once
every record submitted before the call is written (tests, shutdown hooks).
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


class _Flush:
    """A marker put on the queue: its event is set once every record queued before it is written."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class UsageWriter:
    """Writes usage records in batches from a background thread (see the module docstring)."""

    def __init__(self, write_fn: Callable[[list[Any]], None], interval_s: float = INTERVAL_S):
        self._write_fn = write_fn
        self._interval_s = interval_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written = 0  # records written so far
        self.failures = 0  # failed batch writes so far (each retried)

    def start(self) -> UsageWriter:
        """Start the writer thread (once); return self."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="portal-usage-writer", daemon=True)
                self._thread.start()
        return self

    def submit(self, record: Any) -> None:
        """Queue one usage record for the next batch (never blocks)."""
        self._queue.put(record)

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Return True once every record submitted before this call is written (False on timeout or no thread)."""
        if self._thread is None or not self._thread.is_alive():
            return self._queue.empty()
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write every queued record, then stop the thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout_s)

    @property
    def pending(self) -> int:
        """Return roughly how many items wait in the queue."""
        return self._queue.qsize()

    def _run(self) -> None:
        batch: list[Any] = []
        markers: list[_Flush] = []
        stopping = False
        while not stopping:
            deadline = time.monotonic() + self._interval_s
            while True:  # gather until the round's deadline, a flush marker or the stop marker
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                if isinstance(item, _Flush):
                    markers.append(item)
                    break
                batch.append(item)
            if stopping:  # take whatever was queued behind the stop marker too
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, _Flush):
                        markers.append(item)
                    elif item is not _STOP:
                        batch.append(item)
            if batch and self._write(batch, attempts=STOP_RETRIES if stopping else 1):
                batch = []
            if not batch:
                for marker in markers:
                    marker.done.set()
                markers = []
        for marker in markers:  # stop gave up on a failing database: release waiters anyway
            marker.done.set()

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
