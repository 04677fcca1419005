"""Pictures of the matrix layer (matplotlib Agg, no GUI): a pool's heat map, and fleet simulation results.

`draw_pool`: one panel per fabric (the first MAX_FABRICS_DRAWN of a fleet), nodes along x and the devices of
a node along y; each slice has its own colour and its id written on its first device, free devices are light
grey, devices held by another tenant (in a tenant's view) dark grey, failed devices black with a red cross.

`draw_simulation`: utilisation, stranded share and rejection rate per policy; utilisation over time per
policy; and, when given, the pod-size sweep against the allocation rates the CloudMatrix paper reports
(CM-v2 §6.1.2, Fig. 24: over 94% on 384-NPU pods, under 91% on 224-NPU pods).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from matrixstack.errors import UserError
from matrixstack.matrix.pools import FAILED, OTHERS, PoolView
from matrixstack.matrix.simulate import PolicyResult, SweepPoint

FREE_COLOR, OTHERS_COLOR, FAILED_COLOR, CROSS_COLOR = "#e9ecef", "#6c757d", "#212529", "#fa5252"
SLICE_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#393b79", "#e7ba52", "#637939", "#ad494a", "#6baed6", "#7b4173", "#fd8d3c",
)  # fmt: skip
POLICY_COLORS = {"matrix": "#e8590c", "server": "#1c7ed6", "tiered": "#2f9e44"}
PAPER_ALLOCATION = ((224, 0.91, "under 91%"), (384, 0.94, "over 94%"))  # CM-v2 §6.1.2, Fig. 24
MAX_FABRICS_DRAWN = 8
MAX_LEGEND = 16
DPI = 100


def draw_pool(view: PoolView, path: Path | str) -> None:
    """Draw the pool's heat map (see the module docstring) to a PNG file."""
    owners = view.owners[:MAX_FABRICS_DRAWN]
    widest = max(f["nodes"] for f in view.fabrics[: len(owners)])
    width_in = min(24.0, max(8.0, 0.28 * widest + 3.5))
    height_in = max(3.0, 1.6 + sum(0.26 * f["devices_per_node"] + 0.9 for f in view.fabrics[: len(owners)]))
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    axes = fig.subplots(len(owners), 1, squeeze=False)[:, 0]
    slice_ids = sorted({o for row in owners for o in row if o > 0})
    colour_of = {sid: SLICE_COLORS[k % len(SLICE_COLORS)] for k, sid in enumerate(slice_ids)}
    palette = [FREE_COLOR, OTHERS_COLOR, FAILED_COLOR, *SLICE_COLORS]
    for ax, fabric, owner in zip(axes, view.fabrics, owners, strict=False):
        dpn, nodes = fabric["devices_per_node"], fabric["nodes"]
        grid = np.array(owner).reshape(nodes, dpn).T  # rows: device in node; columns: node
        codes = np.zeros_like(grid)
        codes[grid == OTHERS] = 1
        codes[grid == FAILED] = 2
        for sid in slice_ids:
            codes[grid == sid] = 3 + SLICE_COLORS.index(colour_of[sid])
        ax.imshow(codes, cmap=ListedColormap(palette), vmin=0, vmax=len(palette) - 1, aspect="equal")
        ax.set_xticks(np.arange(-0.5, nodes, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, dpn, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        step = 1 if nodes <= 24 else 4
        ax.set_xticks(range(0, nodes, step))
        ax.set_yticks(range(dpn))
        ax.set_xlabel("node")
        ax.set_ylabel("device in node")
        ax.set_title(f"fabric {fabric['index']}: {fabric['name']} ({fabric['devices']} devices)", loc="left")
        failed_y, failed_x = np.nonzero(grid == FAILED)
        ax.scatter(failed_x, failed_y, marker="x", color=CROSS_COLOR, s=40, linewidths=2)
        seen: set[int] = set()
        for x in range(nodes):
            for y in range(dpn):
                sid = int(grid[y, x])
                if sid > 0 and sid not in seen:
                    seen.add(sid)
                    ax.text(x, y, str(sid), ha="center", va="center", fontsize=7, color="white", weight="bold")
    s = view.stats
    who = f"tenant {view.tenant}" if view.tenant else "all tenants"
    fig.suptitle(
        f"pool {view.name} ({who}): {s['allocated']} of {s['devices']} devices allocated, {s['failed']} failed, "
        f"fragmentation {s['fragmentation']:.0%}",
        x=0.01,
        ha="left",
    )
    tenant_of = {sl.id: sl.tenant for sl in view.slices}
    handles = [Patch(color=FREE_COLOR, label="free"), Patch(color=FAILED_COLOR, label="failed (x)")]
    if any(o == OTHERS for row in owners for o in row):
        handles.append(Patch(color=OTHERS_COLOR, label="other tenants"))
    handles += [
        Patch(color=colour_of[sid], label=f"slice {sid} ({tenant_of.get(sid, '?')})") for sid in slice_ids[:MAX_LEGEND]
    ]
    columns = min(8, len(handles))
    legend_in = 0.3 + 0.22 * -(-len(handles) // columns)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_in / height_in, 1, 1 - 0.35 / height_in))
    _save(fig, path)


def draw_simulation(results: list[PolicyResult], sweep: list[SweepPoint] | None, path: Path | str) -> None:
    """Draw the simulation results (and the pod-size sweep when given) to a PNG file."""
    panels = 3 if sweep else 2
    fig = Figure(figsize=(6.0 * panels, 4.8), dpi=DPI)
    axes = fig.subplots(1, panels)
    bars, timeline = axes[0], axes[1]
    names = [r.policy for r in results]
    x = np.arange(len(results))
    series = (
        ("utilisation", [r.utilisation for r in results], 1.0, None),
        ("stranded (held, not asked for)", [r.stranded for r in results], 0.4, None),
        ("rejected jobs", [r.rejection_rate for r in results], 0.25, "//"),
    )
    width = 0.26
    colours = [POLICY_COLORS.get(n, "#495057") for n in names]
    for k, (label, values, alpha, hatch) in enumerate(series):
        drawn = bars.bar(x + (k - 1) * width, values, width, color=colours, alpha=alpha, hatch=hatch)
        bars.bar_label(drawn, labels=[f"{v:.0%}" for v in values], fontsize=8)
        bars.bar([0], [0], color="#495057", alpha=alpha, hatch=hatch, label=label)  # a neutral legend swatch
    bars.set_xticks(x, names)
    bars.set_ylim(0, 1.25)
    bars.set_ylabel("share of the fleet's device-time / of jobs")
    first = results[0]
    bars.set_title(f"{first.pods} x {first.fabric} ({first.devices} devices), {first.jobs} jobs", loc="left")
    bars.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    for r in results:
        times_h = [t / 3600 for t, _ in r.timeline]
        timeline.plot(times_h, [u for _, u in r.timeline], color=POLICY_COLORS.get(r.policy), label=r.policy)
    timeline.set_ylim(0, 1.05)
    timeline.set_xlabel("time (h)")
    timeline.set_ylabel("devices in use by jobs")
    timeline.set_title("utilisation over time", loc="left")
    timeline.legend(fontsize=8)
    if sweep:
        ax = axes[2]
        sizes = [p.pod_devices for p in sweep]
        ax.plot(sizes, [p.result.utilisation for p in sweep], "o-", color=POLICY_COLORS["matrix"], label="simulated")
        for size, share, label in PAPER_ALLOCATION:
            ax.plot([size], [share], "D", color="#212529", markerfacecolor="none")
            ax.annotate(f"paper: {label}", (size, share), textcoords="offset points", xytext=(6, -12), fontsize=8)
        for p in sweep:
            ax.annotate(f"{p.result.utilisation:.1%}", (p.pod_devices, p.result.utilisation), fontsize=8,
                        textcoords="offset points", xytext=(-10, 8))  # fmt: skip
        ax.margins(x=0.1, y=0.2)
        ax.set_xticks(sizes)
        ax.set_xlabel("devices per pod")
        ax.set_ylabel("utilisation")
        ax.set_title(f"pod-size sweep, {sweep[0].result.policy} policy", loc="left")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Figure, path: Path | str) -> None:
    """Write the figure to a PNG file, creating its folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        FigureCanvasAgg(fig).print_png(str(path))
    except OSError as exc:
        raise UserError(f"cannot write the picture to {path}: {exc.strerror}") from None
