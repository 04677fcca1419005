"""`matrixstack calibrate`: measure this machine and write the `local` fabric's efficiency factors."""

from __future__ import annotations

import typer

from matrixstack.cli.common import console, print_json, user_errors_exit_2


def calibrate(
    as_json: bool = typer.Option(False, "--json", help="Print the measured figures as JSON."),
    skip_bus: bool = typer.Option(False, "--skip-bus", help="Keep the estimated local bus (no worker processes)."),
) -> None:
    """Measure GEMM, attention and memory rates, kernel costs and the local bus; write them for `--fabric local`."""
    from matrixstack.fabric.local import calibration_path
    from matrixstack.tools.calibrate import calibrate as run
    from matrixstack.tools.calibrate import fit_misses

    with console.status("measuring this machine (GEMM, attention, memory, kernel costs, local bus)..."):
        measured = run(measure_bus=not skip_bus)
    if as_json:
        print_json({"path": str(calibration_path()), **measured})
        return
    eff = measured["efficiency"]
    console.print(f"wrote {calibration_path()}")
    console.print(
        f"per core: GEMM {eff['gemm']:.0%} of peak, attention {eff['attention']:.0%}, "
        f"memory {measured['hbm_gbs']} GB/s, "
        f"kernel costs {eff['matmul_kernel_us']} us (matrix) / {eff['vector_kernel_us']} us (vector); "
        f"local bus {measured['plane_gbs']} GB/s, {measured['plane_latency_us']} us"
    )
    for batch, pct in fit_misses(measured).items():
        console.print(
            f"[yellow]warning:[/] the fitted model misses the {batch}-sequence decode step by {pct:+.1f}% "
            "(a bound of the fit binds: the steps were likely measured under different load); "
            "rerun `matrixstack calibrate` on a quiet machine"
        )
    console.print("next: matrixstack plan tiny-moe --fabric local --precision fp32")


def register(app: typer.Typer) -> None:
    """Add `calibrate` to the top-level app."""
    app.command("calibrate")(user_errors_exit_2(calibrate))
