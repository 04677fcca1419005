"""Event-driven fleet simulation: replay a job mix on a fleet of pods under each policy, and a pod-size sweep.

The split follows Vidur's simulator: entities (`Job` from `trace`, the running slices), events (arrive,
finish, give up) on one time-ordered heap, and a scheduler that decides which waiting jobs start.

* Fleet: `count` copies of a fabric in one `MatrixPool`; a job's slice stays inside one scale-up domain.
* Scheduler: waiting jobs are kept in arrival order; a pass looks at the oldest `window` of them (default 16)
  and starts every one the policy can place now, so a small job may start before a big one that waits for
  room (backfill without reservations, as Kubernetes and Slurm do by default). A pass runs when a job
  arrives (for that job), when one finishes and when one gives up.
* A job that can never fit (bigger than one domain under the policy) is rejected at once; a job that has
  waited `max_wait_s` (default 4 × the mean duration) gives up and counts as rejected too.

Reported per policy, over the measurement window from `warmup` (10%) of the last arrival time to the last
arrival, so the empty start and the drain after the last arrival don't count:

* `utilisation` — device-seconds of the devices the jobs asked for / device-seconds of the fleet;
* `allocation` — device-seconds handed out (server-level supply rounds slices up to whole nodes) / fleet;
* `stranded` = allocation − utilisation: devices held by slices but not asked for;
* `rejection_rate` — rejected jobs / jobs that arrived; `mean_wait_s` — mean queueing delay of started jobs;
* `fragmentation` — time-average of the pool's fragmentation (`allocator` module docstring): free devices
  that are not on wholly free nodes;
* `split_small_share` — share of started jobs that fit in one node but were placed across several.

The pod-size sweep builds copies of a fabric with fewer nodes (`resize_pod`: 28 nodes of CloudMatrix384 =
224 NPUs) and replays the same jobs, sized for the smallest pod, at the same load on each.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.allocator import MatrixPool
from matrixstack.matrix.policies import Placement, never_fits, place, resolve_ceilings
from matrixstack.matrix.spec import POLICIES
from matrixstack.matrix.trace import Job, JobMix, generate

FINISH, ARRIVE, GIVE_UP = 0, 1, 2  # at equal times: free devices first, then arrivals, then give-ups
DEFAULT_WINDOW = 16
DEFAULT_WARMUP = 0.1
TIMELINE_POINTS = 200


@dataclass(frozen=True)
class PolicyResult:
    """What one policy achieved on one fleet and job list (metrics in the module docstring)."""

    policy: str
    fabric: str
    pods: int
    devices: int
    jobs: int
    started: int
    rejected: int
    utilisation: float
    allocation: float
    rejection_rate: float
    mean_wait_s: float
    fragmentation: float
    split_small_share: float
    timeline: list[tuple[float, float]] = field(repr=False)  # (mid-bin time s, mean utilisation in the bin)

    @property
    def stranded(self) -> float:
        """Return the share of the fleet held by slices but not asked for by their jobs."""
        return self.allocation - self.utilisation

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict (without the timeline)."""
        return {
            "policy": self.policy,
            "fabric": self.fabric,
            "pods": self.pods,
            "devices": self.devices,
            "jobs": self.jobs,
            "started": self.started,
            "rejected": self.rejected,
            "utilisation": round(self.utilisation, 4),
            "allocation": round(self.allocation, 4),
            "stranded": round(self.stranded, 4),
            "rejection_rate": round(self.rejection_rate, 4),
            "mean_wait_s": round(self.mean_wait_s, 1),
            "fragmentation": round(self.fragmentation, 4),
            "split_small_share": round(self.split_small_share, 4),
        }


@dataclass(frozen=True)
class SweepPoint:
    """One pod size of a sweep and what the policy achieved on it."""

    nodes: int
    pod_devices: int
    result: PolicyResult

    def to_dict(self) -> dict[str, Any]:
        """Return the point as a JSON-ready dict."""
        r = self.result
        return {
            "nodes": self.nodes,
            "pod_devices": self.pod_devices,
            "utilisation": round(r.utilisation, 4),
            "allocation": round(r.allocation, 4),
            "rejection_rate": round(r.rejection_rate, 4),
            "mean_wait_s": round(r.mean_wait_s, 1),
        }


def resize_pod(fabric: FabricSpec, nodes: int) -> FabricSpec:
    """Return a copy of the fabric with `nodes` nodes (its tiers capped to the new size), named by its devices."""
    if nodes < 1:
        raise UserError(f"a pod needs at least one node; got {nodes}")
    if nodes == fabric.node_count:
        return fabric
    name = f"{fabric.name}-{nodes * fabric.device.devices_per_node}"
    return FabricSpec.model_validate(fabric.model_copy(update={"node_count": nodes, "name": name}).model_dump())


def run_policy(
    fabric: FabricSpec,
    count: int,
    jobs: list[Job],
    policy: str,
    *,
    window: int = DEFAULT_WINDOW,
    max_wait_s: float | None = None,
    warmup: float = DEFAULT_WARMUP,
) -> PolicyResult:
    """Return what `policy` achieves replaying `jobs` on `count` pods of `fabric` (see the module docstring)."""
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if count < 1 or window < 1:
        raise UserError("--count and the scheduler window must be at least 1")
    if max_wait_s is None:
        max_wait_s = 4 * sum(j.duration_s for j in jobs) / len(jobs)
    pool = MatrixPool([fabric] * count)
    return _Simulation(pool, fabric, count, jobs, policy, window, max_wait_s, warmup).run()


def simulate(
    fabric: FabricSpec,
    count: int,
    policies: list[str],
    jobs: list[Job],
    **options: Any,
) -> list[PolicyResult]:
    """Return one result per policy, each replaying the same jobs on a fresh fleet."""
    return [run_policy(fabric, count, jobs, policy, **options) for policy in policies]


def pod_size_sweep(
    fabric: FabricSpec,
    count: int,
    node_counts: list[int],
    jobs: int,
    seed: int,
    *,
    mix: JobMix | None = None,
    trace_jobs: list[Job] | None = None,
    policy: str = "matrix",
    **options: Any,
) -> list[SweepPoint]:
    """Return what `policy` achieves on fleets of `count` pods of each size (nodes), on the same job mix.

    Generated jobs run up to the smallest pod's scale-up domain, with arrivals scaled to each fleet's devices
    so that the offered load is the same. `trace_jobs` (a replayed trace, meant for `fabric`) are replayed on
    each pod size with their arrival times stretched by the ratio of devices, for the same load.
    """
    if not node_counts:
        raise UserError("a pod-size sweep needs at least one node count, e.g. 28,36,48")
    pods = [resize_pod(fabric, n) for n in sorted(set(node_counts))]
    largest_job = min(p.scale_up_domain_size for p in pods)
    points = []
    for pod in pods:
        if trace_jobs is not None:
            stretch = fabric.device_count / pod.device_count
            job_list = [Job(j.id, j.arrival_s * stretch, j.devices, j.duration_s) for j in trace_jobs]
        else:
            job_list = generate(mix or JobMix(), jobs, pod.device_count * count, largest_job, seed)
        result = run_policy(pod, count, job_list, policy, **options)
        points.append(SweepPoint(pod.node_count, pod.device_count, result))
    return points


class _Simulation:
    """One replay: the pool, the event heap, the waiting queue and the metric integrals."""

    def __init__(self, pool, fabric, count, jobs, policy, window, max_wait_s, warmup):
        self.pool: MatrixPool = pool
        self.fabric, self.count, self.jobs, self.policy = fabric, count, jobs, policy
        self.window, self.max_wait_s = window, max_wait_s
        self.ceilings = resolve_ceilings(pool, None, True)
        self.whole = policy == "server"
        self.dpn = fabric.device.devices_per_node
        self.end_s = max(j.arrival_s for j in jobs)
        self.start_s = warmup * self.end_s
        self.queue: list[int] = []
        self.waiting: set[int] = set()
        self.running: dict[int, Placement] = {}
        self.used_devices = 0
        self.started = self.rejected = self.split_small = 0
        self.wait_total_s = 0.0
        self.used_integral = self.allocated_integral = self.fragmentation_integral = 0.0
        self.last_s = 0.0
        self.timeline: list[tuple[float, float]] = []
        self.bin_s = max(self.end_s, 1e-9) / TIMELINE_POINTS
        self.bin_integral = 0.0
        self._never: dict[int, bool] = {}

    def run(self) -> PolicyResult:
        """Return the metrics after replaying every event up to the last arrival."""
        heap: list[tuple[float, int, int]] = [(job.arrival_s, ARRIVE, i) for i, job in enumerate(self.jobs)]
        heapq.heapify(heap)
        while heap:
            now, kind, i = heapq.heappop(heap)
            if now > self.end_s:
                break
            self._advance(now)
            if kind == ARRIVE:
                self._arrive(i, now, heap)
            elif kind == FINISH:
                placement = self.running.pop(i)
                self.pool.give_back(placement.fabric, placement.devices)
                self.used_devices -= self.jobs[i].devices
                self._pass(now, heap)
            elif i in self.waiting:
                self.queue.remove(i)
                self.waiting.discard(i)
                self.rejected += 1
                self._pass(now, heap)
        self._advance(self.end_s)
        span = max(self.end_s - self.start_s, 1e-9) * self.pool.device_total
        arrived = sum(1 for j in self.jobs if j.arrival_s <= self.end_s)
        return PolicyResult(
            policy=self.policy,
            fabric=self.fabric.name,
            pods=self.count,
            devices=self.pool.device_total,
            jobs=arrived,
            started=self.started,
            rejected=self.rejected,
            utilisation=self.used_integral / span,
            allocation=self.allocated_integral / span,
            rejection_rate=self.rejected / arrived,
            mean_wait_s=self.wait_total_s / self.started if self.started else 0.0,
            fragmentation=self.fragmentation_integral / (span / self.pool.device_total),
            split_small_share=self.split_small / self.started if self.started else 0.0,
            timeline=self.timeline,
        )

    def _arrive(self, i: int, now: float, heap: list) -> None:
        job = self.jobs[i]
        if self._never_fits(job.devices):
            self.rejected += 1
            return
        self.queue.append(i)
        self.waiting.add(i)
        heapq.heappush(heap, (now + self.max_wait_s, GIVE_UP, i))
        if len(self.queue) <= self.window and self._try_start(i, now, heap):
            self.queue.pop()

    def _pass(self, now: float, heap: list) -> None:
        """Start every job among the oldest `window` waiting ones that fits now."""
        at = tried = 0
        while at < len(self.queue) and tried < self.window:
            tried += 1
            if self._try_start(self.queue[at], now, heap):
                del self.queue[at]
            else:
                at += 1

    def _try_start(self, i: int, now: float, heap: list) -> bool:
        job = self.jobs[i]
        if self.whole:
            if math.ceil(job.devices / self.dpn) > self.pool.whole_free_nodes:
                return False
        elif job.devices > self.pool.free_devices:
            return False
        found = place(self.pool, self.policy, job.devices, self.ceilings)
        if not isinstance(found, Placement):
            return False
        self.pool.take(found.fabric, found.devices)
        self.running[i] = found
        self.waiting.discard(i)
        self.used_devices += job.devices
        self.started += 1
        self.wait_total_s += now - job.arrival_s
        if job.devices <= self.dpn and len({d // self.dpn for d in found.devices}) > 1:
            self.split_small += 1
        heapq.heappush(heap, (now + job.duration_s, FINISH, i))
        return True

    def _never_fits(self, devices: int) -> bool:
        known = self._never.get(devices)
        if known is None:
            known = self._never[devices] = never_fits(self.pool, self.policy, devices, self.ceilings) is not None
        return known

    def _advance(self, now: float) -> None:
        """Integrate the metrics from the last event to `now` (inside the measurement window) and the timeline."""
        low, high = max(self.last_s, self.start_s), min(now, self.end_s)
        if high > low:
            dt = high - low
            stats = self.pool.stats()
            self.used_integral += self.used_devices * dt
            self.allocated_integral += stats.allocated * dt
            self.fragmentation_integral += stats.fragmentation * dt
        t = self.last_s
        while t < min(now, self.end_s):  # the timeline: mean utilisation per bin of end_s / TIMELINE_POINTS
            bin_end = (len(self.timeline) + 1) * self.bin_s
            step = min(now, bin_end) - t
            self.bin_integral += self.used_devices * step
            t += step
            if t >= bin_end - 1e-9:
                self.timeline.append(
                    (bin_end - self.bin_s / 2, self.bin_integral / (self.bin_s * self.pool.device_total))
                )
                self.bin_integral = 0.0
        self.last_s = now
