"""How fast the matrix layer hands out and takes back slices: in memory on a large fleet, and through SQLite.

In memory: OPS alloc/free operations (default 100,000) on a fleet of FABRICS copies (default 100) of
`cloudmatrix384` in one `MatrixPool`, with the `matrix` policy and the `server` baseline in the same run.
Slice sizes come from the simulator's default job mix (1 device to a whole domain, mean 10.08). Each
operation allocates while less than TARGET (default 85%) of the fleet is held, else frees a random live
slice; an allocation that does not fit still counts as an operation (and as rejected).

Persisted: SQL_OPS operations (default 1,000) of the same kind through the matrix services on one
`cloudmatrix384` pool in a fresh SQLite file (or the database at --db), each in its own transaction.

    python bench/matrix_speed.py [--ops 100000] [--fabrics 100] [--sql-ops 1000] [--db URL] [--json] [--out FILE]

With --json the last line printed is one JSON object with the figures; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from matrixstack.errors import UserError
from matrixstack.fabric.loader import load_fabric
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.allocator import MatrixPool
from matrixstack.matrix.database import open_database
from matrixstack.matrix.policies import Placement, place, resolve_ceilings
from matrixstack.matrix.pools import create_pool
from matrixstack.matrix.slices import alloc_slice, free_slice
from matrixstack.matrix.spec import SliceRequest
from matrixstack.matrix.trace import JobMix, generate

FABRIC = "cloudmatrix384"
SEED = 7


def sizes(count: int, fleet_devices: int, max_devices: int) -> list[int]:
    """Return `count` slice sizes from the default job mix."""
    return [job.devices for job in generate(JobMix(), count, fleet_devices, max_devices, SEED)]


def in_memory(fabric: FabricSpec, fabrics: int, ops: int, policy: str, target: float, progress: Progress) -> dict:
    """Return the seconds and rate of `ops` alloc/free operations on a fleet held in memory."""
    pool = MatrixPool([fabric] * fabrics)
    ceilings = resolve_ceilings(pool, None, True)
    wanted = sizes(ops, pool.device_total, fabric.scale_up_domain_size)
    rng = random.Random(SEED)
    live: list[Placement] = []
    allocs = frees = rejected = 0
    task = progress.add_task(f"in memory, {policy}", total=ops)
    start = time.perf_counter()
    for op in range(ops):
        held = pool.device_total - pool.free_devices
        if live and held >= target * pool.device_total:
            at = rng.randrange(len(live))
            live[at], live[-1] = live[-1], live[at]
            gone = live.pop()
            pool.give_back(gone.fabric, gone.devices)
            frees += 1
        else:
            found = place(pool, policy, wanted[op], ceilings)
            if isinstance(found, Placement):
                pool.take(found.fabric, found.devices)
                live.append(found)
                allocs += 1
            else:
                rejected += 1
        if op % 5000 == 4999:
            progress.update(task, completed=op + 1)
    seconds = time.perf_counter() - start
    progress.update(task, completed=ops)
    return {
        "policy": policy,
        "ops": ops,
        "seconds": round(seconds, 3),
        "ops_per_s": round(ops / seconds),
        "allocs": allocs,
        "frees": frees,
        "rejected": rejected,
        "held_share_at_end": round(1 - pool.free_devices / pool.device_total, 4),
    }


def persisted(fabric: FabricSpec, ops: int, url: str | None, target: float, progress: Progress) -> dict:
    """Return the seconds and rate of `ops` alloc/free transactions (one unit of work each) on one pool."""
    with tempfile.TemporaryDirectory() as folder:
        database = open_database(url or f"sqlite:///{Path(folder) / 'bench.db'}")
        pool_name = f"bench-{int(time.time() * 1000)}"
        database.write(lambda session: create_pool(session, pool_name, [fabric]))
        wanted = sizes(ops, fabric.device_count, fabric.scale_up_domain_size)
        rng = random.Random(SEED)
        live: list[tuple[int, int]] = []
        held = rejected = 0
        task = progress.add_task("database, matrix", total=ops)
        start = time.perf_counter()
        for op in range(ops):
            if live and held >= target * fabric.device_count:
                at = rng.randrange(len(live))
                live[at], live[-1] = live[-1], live[at]
                slice_id, count = live.pop()
                database.write(partial(free_slice, slice_id=slice_id, tenant="bench"))
                held -= count
            else:
                try:
                    request = SliceRequest(devices=wanted[op])
                    info = database.write(partial(alloc_slice, pool=pool_name, tenant="bench", request=request))
                except UserError:
                    rejected += 1
                else:
                    live.append((info.id, len(info.devices)))
                    held += len(info.devices)
            progress.update(task, completed=op + 1)
        seconds = time.perf_counter() - start
        backend = database.engine.dialect.name
        database.close()
    return {
        "database": backend,
        "ops": ops,
        "seconds": round(seconds, 3),
        "ops_per_s": round(ops / seconds, 1),
        "rejected": rejected,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000, help="alloc/free operations in memory per policy")
    parser.add_argument("--fabrics", type=int, default=100, help="cloudmatrix384 fabrics in the in-memory fleet")
    parser.add_argument("--sql-ops", type=int, default=1000, help="alloc/free transactions through the database")
    parser.add_argument("--target", type=float, default=0.85, help="share of devices held before frees start")
    parser.add_argument("--db", default=None, help="database URL for the persisted run (default: a fresh SQLite)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON figures to this file")
    args = parser.parse_args(argv)
    fabric = load_fabric(FABRIC)
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        memory = [in_memory(fabric, args.fabrics, args.ops, p, args.target, progress) for p in ("matrix", "server")]
        database = persisted(fabric, args.sql_ops, args.db, args.target, progress) if args.sql_ops else None
    result = {
        "benchmark": "matrix_speed",
        "fabric": FABRIC,
        "fleet_fabrics": args.fabrics,
        "fleet_devices": args.fabrics * fabric.device_count,
        "in_memory": memory,
        "database": database,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for row in memory:
        console.print(
            f"in memory, {row['policy']:>6}: {row['ops']:,} ops in {row['seconds']:.2f} s = "
            f"{row['ops_per_s']:,} ops/s ({row['rejected']:,} allocations did not fit)"
        )
    if database:
        console.print(
            f"{database['database']}, matrix: {database['ops']:,} transactions in {database['seconds']:.2f} s = "
            f"{database['ops_per_s']:,} ops/s"
        )
    text = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
