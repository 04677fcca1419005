"""matrix layer: matrix-level supply of slices of one or more fabrics, persisted, with failures and a fleet simulator.

Modules, one job each:

* `spec` — `SliceRequest` (devices or dies, host CPUs, pooled DRAM GiB, `SliceConstraints`), `PolicyName`;
* `topology` — `Topology`: a fabric's nodes, devices and tier ladder (pure);
* `allocator` — `MatrixPool`: free/failed bitmaps and host resources, per-domain counts and indexes;
* `policies` — `place` (matrix / server / tiered), `extend`, `shrink`, `never_fits`, `resolve_ceilings`;
* `store` — SQLAlchemy tables and `open_engine(url)` (SQLite file by default, PostgreSQL by URL);
* `service` — `MatrixService`: create / alloc / free / resize / fail / repair / show / events, one
  transaction each, pool row locked;
* `trace` — the job-mix generator (`JobMix`, `generate`) and the CSV trace format;
* `simulate` — the event-driven fleet simulation (`simulate`, `run_policy`) and `pod_size_sweep`.

The pool heat map and the simulation plots are drawn by `tools.draw.matrix`. The in-memory names are re-exported
here; `service`, `store` and `simulate` are imported from their modules (they pull in SQLAlchemy and numpy).
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
