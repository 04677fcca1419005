"""How long the full plan search takes: DeepSeek-V3 on a 384-NPU CloudMatrix384, on one core.

Compares, in the same run, MatrixStack's search (largest batch per skeleton by bisection, cached collective
costs) with the baseline a spreadsheet would do: the same skeletons with every batch size tried in turn.
Both must find the same best decode throughput. Usage: `python bench/plan_speed.py [--json] [--repeats N]`;
with --json the last line is a JSON object. Results also go to bench/results/plan_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, numpy included
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

from rich.progress import Progress

from matrixstack.arch.loader import load_arch
from matrixstack.fabric.loader import load_fabric
from matrixstack.perf.search import (
    DEFAULT_EXPERT_SKEW,
    DEFAULT_SEQUENCE_EXPERT_CV,
    PhaseSearch,
    search_plan,
    skeletons,
)
from matrixstack.perf.spec import Slo, Workload

RESULTS = Path(__file__).parent / "results"


def linear_scan_decode(arch, fabric, workload, slo) -> tuple[float, int]:
    """Return (best decode tokens/s per device, evaluations) trying every batch of every skeleton in turn."""
    search = PhaseSearch(arch, fabric, workload, slo, "decode")
    fits = lambda s: search.memory(s).fits  # noqa: E731
    candidates = list(skeletons(arch, fabric, "decode", fabric.device_count, {}, fits))
    best, evaluations = 0.0, 0
    with Progress(transient=True) as progress:
        task = progress.add_task("baseline: every batch of every decode skeleton", total=len(candidates))
        for skeleton in candidates:
            batch = 1
            while True:
                result = search.evaluate(skeleton.model_copy(update={"batch_per_device": float(batch)}))
                evaluations += 1
                if not search.meets_slo(result):
                    break
                best = max(best, result.tokens_per_s_per_device)
                batch += 1
            progress.advance(task)
    return best, evaluations


def main() -> None:
    """Run the benchmark and print (and save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with a JSON line")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the full search (best is kept)")
    args = parser.parse_args()
    arch, fabric = load_arch("deepseek-v3"), load_fabric("cloudmatrix384")
    workload = Workload(
        precision="int8", expert_skew=DEFAULT_EXPERT_SKEW, sequence_expert_cv=DEFAULT_SEQUENCE_EXPERT_CV
    )
    slo = Slo(tpot_ms=50, ttft_ms=2000)
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = search_plan(arch, fabric, workload, slo)  # the first run is cold; later ones reuse lru caches
        timings.append(time.perf_counter() - start)
    start = time.perf_counter()
    baseline_best, evaluations = linear_scan_decode(arch, fabric, workload, slo)
    baseline_s = time.perf_counter() - start
    figures = {
        "arch": arch.name,
        "fabric": fabric.name,
        "devices": fabric.device_count,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "search_seconds": round(timings[0], 3),
        "search_seconds_warm": round(min(timings), 3),
        "search_seconds_all": [round(t, 3) for t in timings],
        "decode_tokens_per_s_per_device": round(result.decode.tokens_per_s_per_device, 1),
        "baseline_decode_only_seconds": round(baseline_s, 3),
        "baseline_evaluations": evaluations,
        "baseline_decode_tokens_per_s_per_device": round(baseline_best, 1),
        "speedup_vs_baseline_decode_only": round(baseline_s / min(timings), 1),
        "under_2_s": timings[0] < 2.0,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_speed.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"full plan search: {figures['search_seconds']} s cold, {figures['search_seconds_warm']} s warm, on one core "
        f"(target < 2 s); "
        f"baseline linear batch scan of decode alone: {figures['baseline_decode_only_seconds']} s "
        f"({evaluations} evaluations); best decode rate {figures['decode_tokens_per_s_per_device']} "
        f"vs {figures['baseline_decode_tokens_per_s_per_device']} tok/s/device"
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
