"""Large request bodies parsed in child processes, so that the event loop (and every other request) never waits for
them.

Parsing JSON holds the interpreter lock (`json.loads`, orjson and pydantic's `validate_json` alike; a thread does
not help): a 3 MiB chat body costs a server ~5-10 ms of its event loop, and every other request of the server
waits meanwhile. `BodyPool(workers, threshold_bytes)` does that work elsewhere:

- `await pool.run(job, chunks)` returns `job(raw)`, `raw` the body whose pieces are `chunks` (as they arrived:
  `openai.guard.body_chunks`), or raises what it raised. A body of at most `threshold_bytes`
  (`DEFAULT_THRESHOLD_BYTES`: below it, parsing inline costs the loop less than handing the body over,
  `bench/body_handoff.py`) runs inline. A larger one goes to one of `workers` child processes: the request waits
  for a free child, a worker thread writes the pieces down the child's pipe (never joined here: a copy of a few MiB
  costs milliseconds) and reads its answer (the interpreter lock released while it waits), and only what the job
  returns comes back, so a job that checks a body and refuses it (the engine's prompt length) never sends the body
  back whole. The job's exception is raised here (an `OpenAIError` keeps its status, message, param and code). A
  job is picklable (a module-level function, a method of a picklable object, a `functools.partial` of either),
  needs nothing of the server's state, and so is what it returns. `handed_off` counts the bodies a child parsed.
- The children run at the lowest CPU priority (nice 19): moving a parse off the event loop does not help when the
  cores are what the other requests wait for (a model step on a small machine), so a large body takes the CPU
  they leave; under load its own answer comes later, never theirs.
- Memory is bounded: a child holds one body at a time (at most the server's body limit) and drops it before
  reading the next; requests waiting for a child hold only the body the server has read already.
- The children (`python -m matrixstack.openai.body_pool`) are started by `start()` (the server's lifespan; else the
  first `run` that needs one) and stopped by `close()`. A child dies with its server however the server ends: it
  exits when its request pipe ends, and Linux's parent-death signal (SIGKILL) ends it even in the middle of a
  body when the thread that started it ends (children are started on the event loop's thread, which lives as long
  as the server). A child that dies (killed, out of memory) is replaced at once; the request it held gets a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from matrixstack.openai.errors import OpenAIError

T = TypeVar("T")
DEFAULT_WORKERS = 2
DEFAULT_THRESHOLD_BYTES = 256 * 1024
STOP_TIMEOUT_S = 5.0
HEADER = struct.Struct("<QQ")  # job bytes, body bytes
REPLY = struct.Struct("<Q")  # reply bytes
PR_SET_PDEATHSIG = 1
CHILD_NICENESS = 19  # the lowest priority: on a busy machine the children wait, not the server's requests
SRC_DIR = str(Path(__file__).resolve().parents[2])  # where `matrixstack` is imported from: the children's too


class ChildDied(Exception):
    """The child process ended while it held a body."""


class _Child:
    """One child process and its pipes; `call` is blocking (a worker thread's)."""

    def __init__(self, preload: Sequence[str]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC_DIR, os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", __name__, str(os.getpid()), *preload]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def call(self, job: bytes, chunks: Sequence[bytes], size: int) -> tuple[str, Any]:
        """Return the child's answer to `job` on the body of `size` bytes in `chunks`: ("ok", result) or ("raise",
        exception); ChildDied when the child ended first."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(HEADER.pack(len(job), size))
            stdin.write(job)
            stdin.writelines(chunks)
            stdin.flush()
            head = stdout.read(REPLY.size)
            if len(head) == REPLY.size:
                (size,) = REPLY.unpack(head)
                reply = stdout.read(size)
                if len(reply) == size:
                    return pickle.loads(reply)
        except (BrokenPipeError, ConnectionResetError, ValueError) as exc:  # ValueError: its pipe was closed
            raise ChildDied(f"{exc}") from None
        raise ChildDied(f"exit status {self.process.poll()}")

    def stop(self) -> None:
        """End the child: its pipe closed (it exits), SIGKILL after STOP_TIMEOUT_S; reaped."""
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class BodyPool:
    """Child processes that run jobs on large request bodies (see the module docstring)."""

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        preload: Sequence[str] = (),
    ):
        self.workers = workers
        self.threshold_bytes = threshold_bytes
        self.preload = tuple(preload)  # modules the children import when they start (the jobs' modules)
        self.handed_off = 0
        self._idle: asyncio.Queue[_Child] | None = None
        self._children: list[_Child] = []

    def start(self) -> None:
        """Start the children (on the calling thread: the event loop's)."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.workers):
                self._idle.put_nowait(self._spawn())

    def _spawn(self) -> _Child:
        child = _Child(self.preload)
        self._children.append(child)
        return child

    def pids(self) -> list[int]:
        """Return the children's process ids."""
        return [child.process.pid for child in self._children]

    async def run(self, job: Callable[[bytes], T], chunks: Sequence[bytes]) -> T:
        """Return `job(raw)` of the body `raw` in `chunks`, run inline for a body of at most `threshold_bytes`, else
        in a child process; raise what the job raised, or a 500 when its child died."""
        size = sum(len(chunk) for chunk in chunks)
        if size <= self.threshold_bytes:
            return job(b"".join(chunks))
        self.start()
        assert self._idle is not None
        self.handed_off += 1
        child = await self._idle.get()
        done = asyncio.get_running_loop().run_in_executor(None, child.call, pickle.dumps(job), chunks, size)
        done.add_done_callback(lambda _: self._release(child, done))
        try:
            kind, value = await asyncio.shield(done)  # a cancelled request leaves the child to finish the body
        except ChildDied as exc:
            raise OpenAIError(500, f"the process parsing this request's body died ({exc}); send it again") from None
        if kind == "raise":
            raise value
        return value

    def _release(self, child: _Child, done: asyncio.Future) -> None:
        """Give `child` back to the idle ones once its call is over, or a new child when it died (none once the
        pool is closed)."""
        if self._idle is None:
            return  # closed meanwhile: `close` stopped the child
        if isinstance(done.exception(), ChildDied):
            self._children.remove(child)
            child.stop()
            child = self._spawn()
        self._idle.put_nowait(child)

    def close(self) -> None:
        """Stop every child (the server is ending)."""
        children, self._children, self._idle = self._children, [], None
        for child in children:
            child.stop()


def main(argv: list[str]) -> None:
    """A child: die with the parent (pid `argv[0]`), import the modules `argv[1:]`, then answer jobs from stdin
    until it ends."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(argv[0]):
        return  # the parent is gone already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of the server's terminal: the server ends us
    os.nice(CHILD_NICENESS)  # a large body takes the CPU the server's other requests leave
    for module in argv[1:]:
        importlib.import_module(module)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # what a job prints never mixes with the replies
    while len(head := requests.read(HEADER.size)) == HEADER.size:
        job_size, raw_size = HEADER.unpack(head)
        job, raw = pickle.loads(requests.read(job_size)), requests.read(raw_size)
        try:
            reply: tuple[str, Any] = ("ok", job(raw))
        except Exception as exc:
            reply = ("raise", exc)
        del job, raw  # hold no body while waiting for the next
        try:
            data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an exception that does not pickle: its words
            data = pickle.dumps(("raise", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({exc})")))
        del reply
        replies.write(REPLY.pack(len(data)))
        replies.write(data)
        replies.flush()
        del data


if __name__ == "__main__":
    main(sys.argv[1:])
