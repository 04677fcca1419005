"""Where handing a request body to a child process beats parsing it on the event loop (`openai.body_pool`'s
threshold): for chat bodies of several sizes, the engine's check of a body (`Admission.admit`: parse, validate,
the prompt's length) run inline and through a `BodyPool` child, in one run.

Usage: `python bench/body_handoff.py [--repeats 30] [--json] [--out FILE]`; results go to
bench/results/body_handoff.json. For each size, over `--repeats` bodies: `inline_ms`, the median time the check
holds the event loop when run inline (all of it); `handoff_loop_cpu_ms`, the median CPU time of the event loop's
thread while a child checks the body (what the hand-over costs the loop: the worker thread writing the body
releases the interpreter lock in its writes); `handoff_ms`, the median time the request waits for its child's
answer. Handing off pays where `handoff_loop_cpu_ms` is well under `inline_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import time
from pathlib import Path

from matrixstack.engine.adapter_dir import AdapterDirectory
from matrixstack.engine.admission import Admission
from matrixstack.openai.body_pool import DEFAULT_THRESHOLD_BYTES, BodyPool
from matrixstack.openai.endpoints import CHAT
from matrixstack.openai.errors import OpenAIError

RESULTS = Path(__file__).parent / "results" / "body_handoff.json"
SIZES_KIB = (16, 64, 128, 256, 512, 1024, 3072)
CHUNK_BYTES = 64 * 1024  # about what uvicorn hands on per read
# tiny-moe's max_model_len and max_token_chars, as the engine serves it
ADMISSION = Admission("tiny-moe", 2048, 93, AdapterDirectory({}, None), serves_adapters=True)


def body(size_bytes: int) -> bytes:
    """Return a chat body of about `size_bytes` whose prompt cannot fit (the engine refuses it 400)."""
    content = "word " * (size_bytes // 5)
    return json.dumps({"model": "tiny-moe", "messages": [{"role": "user", "content": content}]}).encode()


JOB = functools.partial(ADMISSION.admit, CHAT, True)  # the engine's check of a body (picklable: the child runs it)


async def handed_off(pool: BodyPool, chunks: list[bytes]) -> None:
    """Check the body in `chunks` in the pool's child (it is refused: the answer is the 400)."""
    with contextlib.suppress(OpenAIError):
        await pool.run(JOB, chunks)


async def loop_cpu(work) -> tuple[float, float]:
    """Return (the CPU time this thread, the event loop's, spent while `work` ran, `work`'s wall time), in s."""
    cpu, wall = time.thread_time(), time.perf_counter()
    await work
    return time.thread_time() - cpu, time.perf_counter() - wall


async def measure(repeats: int) -> dict:
    """Return the figures by body size."""
    pool = BodyPool(workers=1, threshold_bytes=0, preload=(Admission.__module__,))
    pool.start()
    try:
        await handed_off(pool, [body(1024)])  # the child imports what the job needs
        figures = {}
        for size_kib in SIZES_KIB:
            raw = body(size_kib * 1024)
            chunks = [raw[start : start + CHUNK_BYTES] for start in range(0, len(raw), CHUNK_BYTES)]
            inline, loop, waits = [], [], []
            for _ in range(repeats):
                started = time.perf_counter()
                with contextlib.suppress(OpenAIError):
                    JOB(raw)
                inline.append(time.perf_counter() - started)
                spent, waited = await loop_cpu(handed_off(pool, chunks))
                loop.append(spent)
                waits.append(waited)
            figures[f"{size_kib}KiB"] = {
                "inline_ms": round(statistics.median(inline) * 1000, 3),
                "handoff_loop_cpu_ms": round(statistics.median(loop) * 1000, 3),
                "handoff_ms": round(statistics.median(waits) * 1000, 3),
            }
        return figures
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    """Run the bench; write the JSON report and print it (or only the JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (last line)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = {
        "bench": "body_handoff",
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "threshold_bytes": DEFAULT_THRESHOLD_BYTES,
        "sizes": asyncio.run(measure(args.repeats)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        for size, values in report["sizes"].items():
            print(f"{size:>8s} {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
