"""matrix layer: matrix-level supply of slices of one or more fabrics, persisted, with failures and a fleet simulator.

Modules, one job each:

* `spec` — `SliceRequest` (devices or dies, host CPUs, pooled DRAM GiB, `SliceConstraints`), `PolicyName`;
* `topology` — `Topology`: a fabric's nodes, devices and tier ladder (pure);
* `allocator` — `MatrixPool`: free/failed bitmaps and host resources, per-domain counts and indexes;
* `policies` — `place` (matrix / server / tiered), `extend`, `shrink`, `never_fits`, `resolve_ceilings`;
* `store` — SQLAlchemy tables and `open_engine(url)` (SQLite file by default, PostgreSQL by URL);
* `database` — `Database`: the unit of work (`read(op)` / `write(op)`: one committed transaction, retried on
  contention); callers open it, the services below run inside it on its session;
* `tenants` — the one owner of the tenants table (created on first use) and the name rule;
* `pool_state` — a pool's state read inside a transaction (pool row locked for mutations), devices given and taken;
* `pools` — create / list / show pools (`PoolView`);
* `slices` — alloc / free / resize slices (`SliceInfo`);
* `failures` — fail / repair devices, replacing or degrading their slices, healing degraded ones;
* `events` — the event log, one row per mutation;
* `trace` — the job-mix generator (`JobMix`, `generate`) and the CSV trace format;
* `simulate` — the event-driven fleet simulation (`simulate`, `run_policy`) and `pod_size_sweep`.

The pool heat map and the simulation plots are drawn by `tools.draw.matrix`. The in-memory names are re-exported
here; the database modules and `simulate` are imported from their modules (they pull in SQLAlchemy and numpy).
"""

from matrixstack.matrix.allocator import MatrixPool, PoolStats
from matrixstack.matrix.policies import Placement, extend, never_fits, place, resolve_ceilings, shrink
from matrixstack.matrix.spec import POLICIES, PolicyName, SliceConstraints, SliceRequest
from matrixstack.matrix.topology import Tier, Topology, topology_of

__all__ = [
    "POLICIES",
    "MatrixPool",
    "Placement",
    "PolicyName",
    "PoolStats",
    "SliceConstraints",
    "SliceRequest",
    "Tier",
    "Topology",
    "extend",
    "never_fits",
    "place",
    "resolve_ceilings",
    "shrink",
    "topology_of",
]
