"""Draw the decode Pareto front (tokens/s per device against TPOT) with the chosen plan marked."""

from __future__ import annotations

from pathlib import Path


def draw_pareto(
    title: str,
    series: list[tuple[str, list[tuple[float, float]], list[tuple[float, float]], tuple[float, float]]],
    tpot_slo_ms: float,
    path: str | Path,
) -> Path:
    """Draw each (label, all points, front, chosen point) on one chart; return the written PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for (label, points, front, chosen), color in zip(series, colors, strict=False):
        if points:
            ax.scatter(*zip(*points, strict=True), s=6, alpha=0.15, color=color)
        if front:
            ax.plot(*zip(*front, strict=True), "-", color=color, lw=2, label=f"{label}: Pareto front")
        ax.plot(*chosen, marker="*", ms=16, color=color, mec="black", ls="none", label=f"{label}: chosen plan")
    ax.axvline(tpot_slo_ms, color="grey", ls="--", lw=1, label=f"TPOT SLO {tpot_slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("TPOT (ms per output token)")
    ax.set_ylabel("decode tokens/s per device")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
