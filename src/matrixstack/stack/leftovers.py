"""What a local site started, recorded in the data directory, so that a run killed without its tear-down (`kill -9`
of `matrixstack up`, a power cut of its terminal) leaves nothing behind once the next run starts.

Each running site keeps one `RunRecord`: a JSON file in `data_dir()/run/` (`RUN_DIR`) naming its owner (the process
that started the engines: pid and start time) and each engine it runs (deployment name, pid = process group id, start
time), rewritten whenever an engine (re)starts and removed when the site stops. `stop_leftovers(folder)` reads every
record there whose owner no longer runs (no process of that pid, or one that started at another time: the pid was
reused) and kills the process group of each engine it names that still is the same process (its start time from
/proc matches), waits until none of the group is alive, and removes the record; it returns the names of the engines
it stopped. A record whose owner still runs belongs to a live site (another `up` on the same data directory) and
is left alone, as is a recorded pid that now belongs to another process.

Engines already die with the process that started them (`stack.supervise`: Linux's parent-death signal); the record
covers what that cannot: the processes an engine started in its group that outlive it (a vLLM engine core whose
API server was killed), and an engine whose parent-death signal was lost (a setuid binary clears it).
Start times are /proc's (clock ticks since boot); where there is no /proc nothing is recorded or stopped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from matrixstack.paths import data_dir
from matrixstack.procs import start_time
from matrixstack.stack.supervise import POLL_S, STOP_TIMEOUT_S, group_alive, signal_group

RUN_DIR = "run"


def run_dir() -> Path:
    """Return the folder of the local site's run records: `data_dir()/run`."""
    return data_dir() / RUN_DIR


def _is_same(pid: int, started: int | None) -> bool:
    """Return whether `pid` runs and is the process that started at `started`."""
    return started is not None and start_time(pid) == started


class RunRecord:
    """The record of one running site's engines (see the module docstring)."""

    def __init__(self, folder: Path):
        self.path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.json"
        self._lock = threading.Lock()  # engines restart on threads of their own

    def save(self, engines: dict[str, int], owner: int | None = None) -> None:
        """Write the record: `engines` (deployment name -> pid, which is its process group id) started by `owner`
        (default: this process). Nothing where there is no /proc."""
        owner = os.getpid() if owner is None else owner
        if start_time(os.getpid()) is None:
            return
        record = {
            "owner": {"pid": owner, "start": start_time(owner)},
            "engines": [{"name": n, "pid": pid, "start": start_time(pid)} for n, pid in sorted(engines.items())],
        }
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(record))
            partial.replace(self.path)

    def remove(self) -> None:
        """Remove the record (the site stopped what it started)."""
        self.path.unlink(missing_ok=True)


def stop_leftovers(folder: Path) -> list[str]:
    """Stop the engines recorded in `folder` by sites whose owner no longer runs (see the module docstring); return
    the names of those it stopped."""
    stopped: list[str] = []
    if not folder.is_dir():
        return stopped
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            owner = record["owner"]
            engines = record["engines"]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: nothing in it can be checked, so nothing is killed
            continue
        if _is_same(owner["pid"], owner["start"]):
            continue
        groups = []
        for engine in engines:
            pid = engine["pid"]
            # the engine itself, or what is left of its group once it died (a live group's id is never reused)
            if _is_same(pid, engine["start"]) or (start_time(pid) is None and group_alive(pid)):
                signal_group(pid, signal.SIGKILL)
                groups.append(pid)
                stopped.append(engine["name"])
        deadline = time.monotonic() + STOP_TIMEOUT_S  # SIGKILL is final; only a process stuck in the kernel waits
        while any(group_alive(pgid) for pgid in groups) and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
        path.unlink(missing_ok=True)
    return stopped
