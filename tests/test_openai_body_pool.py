"""`openai.body_pool`: small bodies run inline, large ones in a child process (whole, however many pieces they came
in); a job's errors come back as raised; a child that dies is replaced; the children end with `close()`, and with
their server even when it is killed with SIGKILL.

The jobs here are functions of this module, which the children import (this folder is put on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrixstack.openai.body_pool import SRC_DIR, BodyPool
from matrixstack.openai.errors import OpenAIError
from matrixstack.procs import proc_stat

THRESHOLD = 1000
WAIT_S = 15.0  # a failure guard for what must happen, never a timing assertion


def where(raw: bytes) -> tuple[int, int, bytes]:
    """A job: (the pid it ran in, the body's length, its first and last byte)."""
    return os.getpid(), len(raw), raw[:1] + raw[-1:]


def refuse(raw: bytes) -> None:
    """A job that refuses every body as the engine refuses a prompt that cannot fit."""
    raise OpenAIError(400, f"the prompt is {len(raw)} characters", "messages", "context_length_exceeded")


def fail(raw: bytes) -> None:
    """A job that breaks."""
    raise ValueError("not this one")


@pytest.fixture(autouse=True)
def _jobs_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))


def alive(pid: int) -> bool:
    """Return whether process `pid` runs (a zombie, which only waits to be reaped, does not)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def run(coroutine):
    return asyncio.run(coroutine)


def test_small_bodies_run_inline_and_large_ones_in_a_child_whole():
    async def scenario():
        pool = BodyPool(workers=1, threshold_bytes=THRESHOLD)
        try:
            small = await pool.run(where, [b"a" * 10, b"b" * 10])
            large = await pool.run(where, [b"a" + b"x" * 700, b"y" * 700 + b"b", b"", b"z" * 5])
            return small, large, pool.pids(), pool.handed_off
        finally:
            pool.close()

    small, large, pids, handed_off = run(scenario())
    assert small == (os.getpid(), 20, b"ab")
    assert large == (pids[0], 1407, b"az") and pids[0] != os.getpid()
    assert handed_off == 1


def test_a_jobs_error_comes_back_as_raised():
    async def scenario():
        pool = BodyPool(workers=1, threshold_bytes=THRESHOLD)
        try:
            with pytest.raises(OpenAIError) as refused:
                await pool.run(refuse, [b"x" * 2000])
            with pytest.raises(ValueError, match="not this one"):
                await pool.run(fail, [b"x" * 2000])
            return refused.value, await pool.run(where, [b"x" * 2000])  # the child still serves
        finally:
            pool.close()

    refused, served = run(scenario())
    assert refused.body() == {"error": {"message": "the prompt is 2000 characters", "type": "invalid_request_error",
                                        "param": "messages", "code": "context_length_exceeded"}}  # fmt: skip
    assert refused.status_code == 400 and served[1] == 2000


def test_a_child_that_dies_is_replaced_and_close_ends_them_all():
    async def scenario():
        pool = BodyPool(workers=2, threshold_bytes=THRESHOLD)
        pool.start()
        before = pool.pids()
        os.kill(before[0], signal.SIGKILL)  # the first child is the first the next body goes to
        with pytest.raises(OpenAIError) as died:
            await pool.run(where, [b"x" * 2000])
        served = [await pool.run(where, [b"x" * 2000]) for _ in range(3)]
        after = pool.pids()
        pool.close()
        return before, died.value, served, after

    before, died, served, after = run(scenario())
    assert died.status_code == 500 and "died" in died.message
    assert before[1] in after and before[0] not in after and len(after) == 2
    assert {pid for pid, *_ in served} <= set(after)
    assert not any(alive(pid) for pid in before + after)


SERVER = """
import asyncio, sys
from matrixstack.openai.body_pool import SRC_DIR, BodyPool

async def main():
    pool = BodyPool(workers=2)
    pool.start()
    print(*pool.pids(), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_children_die_with_their_server_killed_by_sigkill():
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(pid) for pid in server.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        server.kill()
        server.wait()
        deadline = time.monotonic() + WAIT_S
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, f"children {pids} outlived their server"
            time.sleep(0.05)
    finally:
        server.kill()
        server.wait()
