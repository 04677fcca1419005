"""Processes as Linux's /proc tells them: `proc_stat(pid)` (the fields of /proc/PID/stat) and `start_time(pid)`
(when it started, in clock ticks since boot), which with the pid names one process for good: a pid the kernel reused
belongs to a process that started at another time. Where there is no /proc, no process is found."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")  # where it exists (its self/stat readable), processes are read from it
STARTTIME_FIELD = 19  # /proc/PID/stat field 22 (starttime), counted after the ")" that ends the command name
ENDED_STATES = ("Z", "X")  # a zombie (ended, awaiting its parent's wait()) and a dead process run no more


def proc_stat(pid: int | str) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (state, parent pid, process group, ...), None
    when process `pid` does not exist (or there is no /proc)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Return when process `pid` started (clock ticks since boot), None when it does not run (no such process, or
    one that ended and waits to be reaped)."""
    fields = proc_stat(pid)
    return None if fields is None or fields[0] in ENDED_STATES else int(fields[STARTTIME_FIELD])
