"""Expert-load imbalance: how much more work the busiest expert-parallel rank gets than the average.

Model, in two parts:

1. Planned placement. Expert popularity follows a Zipf law with exponent `skew` (0 = every expert equally
   popular). Redundant slots go, one at a time, to the expert with the highest load per copy (xDeepServe's
   greedy redundant-expert selection, cloudmatrix384.md §4); copies split their expert's load evenly. Slots go
   to ranks longest-first, each to the least-loaded rank with a free slot (EPLB's balanced packing).
2. Drift. EPLB places experts on loads measured over a past window; a batch's loads differ, the more so the
   fewer sequences the batch holds (one prompt's tokens favour the same experts). Each slot's load in a batch is
   its planned load times a log-normal factor with coefficient of variation `drift_cv` (the step model passes
   a per-sequence variation divided by the square root of the sequences in the batch); the busiest rank is
   averaged over `_DRIFT_SAMPLES` seeded draws, so the result is deterministic.

The result is max rank load / mean rank load. With skew 0 and drift 0 ("perfect EPLB") it is 1.
"""

from __future__ import annotations

import heapq
import math
from functools import lru_cache

import numpy as np

_DRIFT_SAMPLES = 16
_SEED = 20250618  # any fixed seed: the draws only need to be the same on every run


def _planned_slots(routed_experts: int, redundant_experts: int, ranks: int, skew: float) -> list[list[float]]:
    """Return, per rank, the planned loads of its expert slots (sum over all ranks = 1)."""
    slots = routed_experts + redundant_experts
    popularity = [1.0 / (i + 1) ** skew for i in range(routed_experts)]
    total = sum(popularity)
    copies = [1] * routed_experts
    heap = [(-p, i) for i, p in enumerate(popularity)]
    heapq.heapify(heap)
    for _ in range(redundant_experts):
        _, expert = heapq.heappop(heap)
        copies[expert] += 1
        heapq.heappush(heap, (-popularity[expert] / copies[expert], expert))
    slot_loads = sorted(
        (popularity[e] / copies[e] / total for e in range(routed_experts) for _ in range(copies[e])), reverse=True
    )
    per_rank = slots // ranks
    placed: list[list[float]] = [[] for _ in range(ranks)]
    rank_heap = [(0.0, r) for r in range(ranks)]
    heapq.heapify(rank_heap)
    for load in slot_loads:
        parked = []
        while True:
            rank_load, rank = heapq.heappop(rank_heap)
            if len(placed[rank]) < per_rank:
                break
            parked.append((rank_load, rank))
        placed[rank].append(load)
        heapq.heappush(rank_heap, (rank_load + load, rank))
        for item in parked:
            heapq.heappush(rank_heap, item)
    return placed


@lru_cache(maxsize=4096)
def _placement(routed_experts: int, redundant_experts: int, ranks: int, skew: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (planned load per slot, rank index per slot) as arrays."""
    placed = _planned_slots(routed_experts, redundant_experts, ranks, skew)
    loads = np.array([load for rank_loads in placed for load in rank_loads])
    owner = np.array([rank for rank, rank_loads in enumerate(placed) for _ in rank_loads])
    return loads, owner


@lru_cache(maxsize=16384)
def imbalance_factor(
    routed_experts: int, redundant_experts: int, ranks: int, skew: float, drift_cv: float = 0.0
) -> float:
    """Return max/mean token load over the `ranks` ranks that host routed experts (>= 1; 1.0 is balance)."""
    slots = routed_experts + redundant_experts
    if ranks <= 0 or slots % ranks:
        raise ValueError(f"{slots} expert slots do not divide evenly over {ranks} ranks")
    if skew == 0 and drift_cv == 0:
        return 1.0
    loads, owner = _placement(routed_experts, redundant_experts, ranks, skew)
    if drift_cv == 0:
        return float(np.bincount(owner, loads, ranks).max() * ranks)
    sigma = math.sqrt(math.log(1 + drift_cv**2))
    noise = np.random.default_rng(_SEED).normal(-sigma * sigma / 2, sigma, (_DRIFT_SAMPLES, loads.size))
    drawn = loads * np.exp(noise)
    per_rank = np.stack([np.bincount(owner, row, ranks) for row in drawn])
    return float((per_rank.max(axis=1) / per_rank.mean(axis=1)).mean())
