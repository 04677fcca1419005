"""Does the perf model predict this machine's engine after `matrixstack calibrate`?

Runs the calibration (into a scratch MATRIXSTACK_HOME unless --keep), then for tiny-moe on one core compares
the engine's measured decode step (LLMEngine + ModelRunner, single-threaded, random weights, 48-token prompts,
32 output tokens) with what `matrixstack plan tiny-moe --fabric local --precision fp32 --input-len 48
--output-len 32 --pin decode.devices=1 --pin decode.batch_per_device=B --pin decode.microbatches=1` predicts,
for several batch sizes. The issue's target: within 25%. Batches 1 and 32 are where the kernel costs and the GEMM
efficiency are fitted (`tools.calibrate.FIT_BATCHES`), so the batches between are the test. `--json` ends with a
JSON line; results go to bench/results/calibrate_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Calibrate, measure, predict, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with a JSON line")
    parser.add_argument("--keep", action="store_true", help="calibrate the real data directory, not a scratch one")
    parser.add_argument("--batches", default="1,2,4,8,12,16,24,32", help="decode batch sizes to compare")
    args = parser.parse_args()
    if not args.keep:
        os.environ["MATRIXSTACK_HOME"] = tempfile.mkdtemp(prefix="matrixstack-calibrate-")

    import torch
    from rich.progress import track

    from matrixstack.arch.loader import load_arch
    from matrixstack.fabric.local import detect_local_fabric
    from matrixstack.perf.search import search_plan
    from matrixstack.perf.spec import Slo, Workload
    from matrixstack.tools.calibrate import (
        DECODE_TOKENS,
        FIT_BATCHES,
        PROMPT_TOKENS,
        calibrate,
        decode_step_seconds,
    )

    measured = calibrate()
    torch.set_num_threads(1)
    workload = Workload(input_len=PROMPT_TOKENS, output_len=DECODE_TOKENS, precision="fp32")
    rows = []
    for batch in track([int(b) for b in args.batches.split(",")], description="measuring decode steps"):
        pins = {"decode": {"devices": 1, "batch_per_device": batch, "microbatches": 1}, "prefill": {"devices": 1}}
        plan = search_plan(
            load_arch("tiny-moe"), detect_local_fabric(), workload, Slo(tpot_ms=1e9, ttft_ms=1e9), 2, pins
        )
        predicted_ms = plan.decode.step.time_us / 1e3
        measured_ms = decode_step_seconds(batch) * 1e3
        rows.append(
            {
                "batch": batch,
                "measured_ms": round(measured_ms, 3),
                "predicted_ms": round(predicted_ms, 3),
                "error": round(predicted_ms / measured_ms - 1, 4),
            }
        )
    worst = max(abs(r["error"]) for r in rows if r["batch"] not in FIT_BATCHES)
    result = {
        "calibration": measured,
        "rows": rows,
        "fitted_batches": list(FIT_BATCHES),
        "max_abs_error_excluding_fitted_batches": worst,
        "within_25pct": worst <= 0.25,
    }
    for r in rows:
        print(
            f"batch {r['batch']:3d}: measured {r['measured_ms']:8.2f} ms, "
            f"predicted {r['predicted_ms']:8.2f} ms ({r['error']:+.1%})"
        )
    print(f"largest error away from the fitted batches {FIT_BATCHES}: {worst:.1%} (target 25%)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibrate_check.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
