"""Job mixes for the fleet simulation: a seeded generator with documented defaults, and a CSV trace format.

The default mix (`JobMix()`), per job:

* size — devices, from 1 up to a whole scale-up domain: P(s) ∝ s^-alpha for s = 1..D, with alpha solved so
  that the mean size is `mean_devices` = 10.08, the average block size at which the CloudMatrix paper
  reports its allocation rates (CM-v2 §6.1.2, Fig. 24). D is the smallest scale-up domain of the fleet
  (384 devices on `cloudmatrix384`: alpha = 1.64; 46% of jobs take 1 device, 83% at most 8, 1 in 120 more
  than 200).
* arrivals — a Poisson process whose rate gives an offered load of `load` = 1.0 (device-seconds asked per
  second = the fleet's device count): rate = load × fleet devices / (mean size × mean duration).
* duration — lognormal with mean `mean_duration_s` = 3,600 s and log-space sigma `duration_sigma` = 1.0,
  independent of the size.

Jobs are drawn from one seeded numpy generator: sizes, durations and inter-arrival gaps in units of the
mean gap. A fleet of another size gets the same jobs with the gaps rescaled to its capacity, so a pod-size
sweep compares the same work at the same load.

CSV trace format: a header line `job,arrival_s,devices,duration_s`, then one job per line: an integer id,
the arrival time in seconds (>= 0), the number of devices (integer >= 1) and the run time in seconds (> 0).
Blank lines and lines starting with `#` are skipped; jobs are replayed in arrival order.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matrixstack.errors import UserError

TRACE_COLUMNS = ("job", "arrival_s", "devices", "duration_s")


@dataclass(frozen=True)
class Job:
    """One job of a trace: when it arrives, how many devices it needs, how long it runs."""

    id: int
    arrival_s: float
    devices: int
    duration_s: float


@dataclass(frozen=True)
class JobMix:
    """Parameters of the generated job mix (defaults in the module docstring)."""

    mean_devices: float = 10.08
    load: float = 1.0
    mean_duration_s: float = 3600.0
    duration_sigma: float = 1.0


def size_exponent(mean_devices: float, max_devices: int) -> float:
    """Return alpha such that P(s) ∝ s^-alpha on 1..max_devices has mean `mean_devices`."""
    sizes = np.arange(1, max_devices + 1, dtype=float)
    if not 1.0 <= mean_devices <= sizes.mean():
        raise UserError(
            f"mean job size {mean_devices:g} devices is outside 1..{sizes.mean():g} "
            f"(the mean of sizes 1..{max_devices})"
        )

    def mean(alpha: float) -> float:
        weights = sizes**-alpha
        return float((sizes * weights).sum() / weights.sum())

    low, high = 0.0, 8.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) > mean_devices else (low, mid)
    return (low + high) / 2


def generate(mix: JobMix, jobs: int, fleet_devices: int, max_devices: int, seed: int) -> list[Job]:
    """Return `jobs` jobs of the mix for a fleet of `fleet_devices` devices, sizes 1..`max_devices`, seeded."""
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    if mix.load <= 0 or mix.mean_duration_s <= 0 or mix.duration_sigma < 0:
        raise UserError("the job mix needs load > 0, mean duration > 0 s and duration sigma >= 0")
    alpha = size_exponent(mix.mean_devices, max_devices)
    sizes = np.arange(1, max_devices + 1)
    weights = sizes.astype(float) ** -alpha
    rng = np.random.default_rng(seed)
    drawn = rng.choice(sizes, size=jobs, p=weights / weights.sum())
    mu = math.log(mix.mean_duration_s) - mix.duration_sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    durations = rng.lognormal(mu, mix.duration_sigma, size=jobs)
    gaps = rng.exponential(1.0, size=jobs)
    rate_per_s = mix.load * fleet_devices / (mix.mean_devices * mix.mean_duration_s)
    arrivals = np.cumsum(gaps) / rate_per_s
    return [
        Job(i, float(arrivals[i]), int(drawn[i]), float(durations[i]))
        for i in range(jobs)  # ids in arrival order
    ]


def write_trace(jobs: list[Job], path: Path | str) -> None:
    """Write jobs to a CSV trace file (format in the module docstring)."""
    with Path(path).open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(TRACE_COLUMNS)
        for job in jobs:
            writer.writerow([job.id, f"{job.arrival_s:.3f}", job.devices, f"{job.duration_s:.3f}"])


def read_trace(path: Path | str) -> list[Job]:
    """Return the jobs of a CSV trace in arrival order; raises a UserError naming the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read trace {path}: {exc.strerror}") from None
    jobs: list[Job] = []
    header_seen = False
    for number, row in _rows(text):
        if not header_seen:
            if tuple(c.strip() for c in row) != TRACE_COLUMNS:
                raise UserError(f"trace {path} line {number}: expected the header {','.join(TRACE_COLUMNS)}")
            header_seen = True
            continue
        if len(row) != len(TRACE_COLUMNS):
            raise UserError(f"trace {path} line {number}: expected {len(TRACE_COLUMNS)} fields, got {len(row)}")
        jobs.append(_job(path, number, row))
    if not jobs:
        raise UserError(f"trace {path} has no jobs; expected the header {','.join(TRACE_COLUMNS)} and one line per job")
    return sorted(jobs, key=lambda j: (j.arrival_s, j.id))


def _rows(text: str):
    """Yield (line number, fields) of the non-blank, non-comment lines of a CSV text."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, next(csv.reader([line]))


def _job(path: Path, number: int, row: list[str]) -> Job:
    """Return the job of one trace line, or raise a UserError naming the line and the bad field."""
    values: dict[str, float] = {}
    for name, raw in zip(TRACE_COLUMNS, row, strict=True):
        try:
            values[name] = float(raw)
        except ValueError:
            raise UserError(f"trace {path} line {number}: {name} {raw.strip()!r} is not a number") from None
    for name in ("job", "devices"):
        if not values[name].is_integer():
            raise UserError(f"trace {path} line {number}: {name} must be an integer, got {values[name]:g}")
    if values["devices"] < 1:
        raise UserError(f"trace {path} line {number}: devices must be at least 1")
    if not values["arrival_s"] >= 0 or not math.isfinite(values["arrival_s"]):
        raise UserError(f"trace {path} line {number}: arrival_s must be a finite number of seconds >= 0")
    if not values["duration_s"] > 0 or not math.isfinite(values["duration_s"]):
        raise UserError(f"trace {path} line {number}: duration_s must be a finite number of seconds > 0")
    return Job(int(values["job"]), values["arrival_s"], int(values["devices"]), values["duration_s"])
