"""Pictures of the fabric layer as PNGs: a fabric's topology (`draw_fabric`), and the published EP dispatch/combine
latencies against the model's (`draw_comparison`, the rows of `fabric.ep_validation.compare`).

`draw_fabric` draws nodes with their devices, dies and host CPUs, every plane's switch tiers, and links.

The picture follows the vendors' topology diagrams (CloudMatrix384 paper Figs. 2 and 5, the DGX SuperPOD
reference architecture). Scale-up switch tiers sit above the grid of nodes; a node-level tier (CloudMatrix384's
seven L1 UB chips, a DGX's NVSwitches) is the strip at the top of each node. Scale-out and frontend tiers sit
below the grid. Each plane has one colour. Rails (device k, or switch chip k, of every node wired to switch k or
sub-plane k of the tier above) run as parallel lines through the gaps between node rows and along the margins;
where a tier's switches don't line up with rails, each node is joined by one bundle line.

Geometry is in "units" (a device square is 1 x 1); the figure maps units to pixels at one scale, so text sizes
are given in pixels and converted.
"""

from __future__ import annotations

import itertools
import math
import pathlib
from collections import defaultdict
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: no GUI, no global backend switch
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch, Rectangle

from matrixstack.fabric.ep_validation import Row
from matrixstack.fabric.spec import FabricSpec, PlaneSpec, TierSpec

PLANE_COLORS = {"scale_up": "#e8590c", "scale_out": "#1c7ed6", "frontend": "#2f9e44"}
DEVICE_COLORS = ("#343a40", "#868e96")  # alternate die shades inside a device square
CPU_COLOR = "#9c36b5"
NODE_FACE, NODE_EDGE, TEXT = "#f8f9fa", "#495057", "#212529"
_CLEAR = {"facecolor": "white", "edgecolor": "none", "pad": 1.0}  # text box that hides the lines behind it

MAX_NODES_DRAWN = 128  # more nodes than this: draw the first NODES_WHEN_ELIDED and an ellipsis box
NODES_WHEN_ELIDED = 96
MAX_DOMAIN_GROUPS = 8  # a tier with more domains than this is drawn as one aggregated box
DEV, DEV_PITCH, PAD = 1.0, 1.15, 0.3
L1_H, CPU_H, NODE_GAP = 0.55, 0.7, 1.0
RAIL_GAP, RAIL_DY, LANE_GAP, LANE_DX = 0.45, 0.3, 0.8, 0.35
TIER_H, FRONTEND_TIER_H, TIER_GAP, MIN_BOX_W = 2.4, 1.2, 2.2, 3.0
GRID_UNITS, MIN_ROW_W = 180.0, 60.0  # widest node grid, narrowest tier row, in units
WIDTH_PX, MAX_PX_PER_UNIT, DPI = (1800, 2600), 24.0, 100


@dataclass
class _Tier:
    """One switch tier drawn as a row of boxes; rails > 1 when link k of every node lands on box k of its domain."""

    plane: PlaneSpec
    tier: TierSpec
    boxes: list[tuple[float, float, int, str]]  # x0, x1, domain group, label
    groups: int
    domains: int
    nodes: int
    rails: int = 1
    per_row: int = 1  # most domain groups the nodes of one grid row fall into
    y0: float = 0.0
    y1: float = 0.0

    def group_of(self, node: int) -> int:
        """Return the domain group (box group) a node links to."""
        return node // self.tier.nodes_per_domain if self.groups > 1 else 0

    def row_groups(self, g: _Grid, r: int) -> list[int]:
        """Return the domain groups, left to right, that the nodes of grid row r belong to."""
        return sorted({self.group_of(i) for i in g.row(r)})

    @property
    def slots(self) -> int:
        """Return how many parallel bus lines the tier needs in the gap beside a row of nodes."""
        return self.rails * self.per_row


@dataclass
class _Grid:
    """Where the nodes sit: columns, node size, row tops (y) and the node-level scale-up tier."""

    drawn: int
    cols: int
    rows: int  # node rows, the ellipsis box's included
    w: float
    h: float
    dev_cols: int
    dev_rows: int
    l1: int
    tops: list[float]

    def row(self, r: int) -> range:
        """Return the nodes in grid row r."""
        return range(r * self.cols, min((r + 1) * self.cols, self.drawn))

    def x0(self, i: int) -> float:
        """Return the left edge of node i."""
        return (i % self.cols) * (self.w + NODE_GAP)

    def top(self, i: int) -> float:
        """Return the top edge of node i (valid once the rows are laid out)."""
        return self.tops[i // self.cols]


class _Pen:
    """Writes text on one matplotlib Axes and batches patches and line segments (per style) until flush()."""

    def __init__(self, ax, px_per_unit: float) -> None:
        self.ax, self.s = ax, px_per_unit
        self.patches: list[Patch] = []
        self.lines: dict[tuple[str, float, float], list] = defaultdict(list)

    def u(self, px: float) -> float:
        """Return px pixels in units."""
        return px / self.s

    def box(self, x0, y0, w, h, face, edge=NODE_EDGE, lw=0.6, **kw) -> None:
        self.patches.append(Rectangle((x0, y0), w, h, facecolor=face, edgecolor=edge, linewidth=lw, **kw))

    def text(self, x, y, s, pt=8.0, **kw) -> None:
        self.ax.text(x, y, s, fontsize=pt, color=kw.pop("color", TEXT), **kw)

    def line(self, points, color, lw=0.7, alpha=0.9) -> None:
        self.lines[(color, lw, alpha)].append(points)

    def flush(self) -> None:
        """Add the batched patches (in drawing order), then the lines over them, to the Axes."""
        self.ax.add_collection(PatchCollection(self.patches, match_original=True, zorder=1))
        for (color, lw, alpha), segs in self.lines.items():
            self.ax.add_collection(LineCollection(segs, colors=color, linewidths=lw, alpha=alpha, zorder=1))


def draw_fabric(fabric: FabricSpec, path: str | pathlib.Path) -> pathlib.Path:
    """Render `fabric` as a topology picture and return the path of the PNG written at `path`."""
    path = pathlib.Path(path)
    up = fabric.plane("scale_up")
    assert up is not None  # FabricSpec guarantees a scale-up plane
    l1 = up.tiers[0].switches_per_domain if up.tiers[0].nodes_per_domain == 1 else 0
    grid = _grid(fabric, l1)
    gw = grid.cols * (grid.w + NODE_GAP) - NODE_GAP
    rx0 = min(0.0, (gw - MIN_ROW_W) / 2)  # tier rows are centred on the grid and at least MIN_ROW_W wide
    rx1 = gw - rx0
    ups = [_tier(fabric, up, t, grid, (rx0, rx1), l1, first=i == 0) for i, t in enumerate(_external(up))]
    downs = [
        [_tier(fabric, p, t, grid, (rx0, rx1), 0, first=i == 0) for i, t in enumerate(_external(p))]
        for p in (fabric.plane("scale_out"), fabric.plane("frontend"))
        if p is not None
    ]
    lanes_left = ups[0].groups * ups[0].rails if ups else 0
    lanes_right = sum(d[0].groups * d[0].rails for d in downs)
    left = LANE_GAP + lanes_left * LANE_DX + 1.0
    right = LANE_GAP + lanes_right * LANE_DX + 1.0
    content_w = left + rx1 - rx0 + right
    s = min(MAX_PX_PER_UNIT, WIDTH_PX[1] / content_w)
    width_px = min(max(content_w * s, WIDTH_PX[0]), WIDTH_PX[1])
    x_lo = rx0 - left - (width_px / s - content_w) / 2

    fig = Figure(figsize=(width_px / DPI, 1), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    pen = _Pen(ax, s)
    y_bottom = _legend(pen, fabric, x_lo + pen.u(30), _stack(pen, grid, ups, downs) - pen.u(30))

    _nodes(pen, fabric, grid)
    if ups:
        _connect(pen, grid, ups, side=-1, lane_base=rx0 - LANE_GAP, rail_base=0)
    lane, rail = 0, 0
    for tiers in downs:
        _connect(pen, grid, tiers, side=1, lane_base=rx1 + LANE_GAP + lane * LANE_DX, rail_base=rail)
        lane, rail = lane + tiers[0].groups * tiers[0].rails, rail + tiers[0].slots
    for tiers in [ups, *downs]:
        _mesh(pen, tiers)
    _title(pen, fabric, x_lo + pen.u(30))
    pen.flush()

    height_units = -y_bottom + pen.u(20)
    fig.set_size_inches(width_px / DPI, height_units * s / DPI)
    ax.set_xlim(x_lo, x_lo + width_px / s)
    ax.set_ylim(-height_units, 0)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _stack(pen: _Pen, grid: _Grid, ups: list[_Tier], downs: list[list[_Tier]]) -> float:
    """Lay out top to bottom: scale-up tiers, node rows with their bus gaps, then each lower plane's tiers.

    Draws the tier rows, fills grid.tops and returns the y of the lowest thing drawn.
    """
    y = -pen.u(70)  # below the title
    for t in reversed(ups):
        y = _place(pen, t, y) - TIER_GAP
    up_gap = RAIL_GAP + ups[0].slots * RAIL_DY if ups else 0.0
    down_gap = RAIL_GAP + sum(d[0].slots for d in downs) * RAIL_DY if downs else 0.0
    y = ups[0].y0 - up_gap if ups else y
    for _ in range(grid.rows):
        grid.tops.append(y - up_gap)
        y = grid.tops[-1] - grid.h - down_gap
    for tiers in downs:
        y -= RAIL_GAP + tiers[0].rails * RAIL_DY
        for t in tiers:
            y = _place(pen, t, y) - TIER_GAP
    return y + (TIER_GAP if downs else 0.0)


def _n(count: int, noun: str) -> str:
    """Return '1 node', '2 nodes', '2 switches': a count with its noun in the right number."""
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('ch') else 's'}"


def _external(plane: PlaneSpec) -> list[TierSpec]:
    """Return the tiers drawn as rows outside the nodes: all but a scale-up plane's node-level tier."""
    return [t for t in plane.tiers if plane.kind != "scale_up" or t.nodes_per_domain > 1]


def _grid(fabric: FabricSpec, l1: int) -> _Grid:
    """Return the node grid: node size from the devices, columns aligned to switch domains where possible."""
    dpn = fabric.device.devices_per_node
    dev_cols = dpn if dpn <= 8 else math.ceil(math.sqrt(2 * dpn))
    dev_rows = math.ceil(dpn / dev_cols)
    w = max(4.0, dev_cols * DEV_PITCH - (DEV_PITCH - DEV) + 2 * PAD)
    h = 2 * PAD + (L1_H + 0.25 if l1 else 0) + dev_rows * DEV_PITCH + 0.2 + CPU_H
    drawn = fabric.node_count if fabric.node_count <= MAX_NODES_DRAWN else NODES_WHEN_ELIDED
    cells = drawn + (drawn < fabric.node_count)
    max_cols = max(1, min(24, int(GRID_UNITS / (w + NODE_GAP))))
    spans = {t.nodes_per_domain for p in fabric.planes for t in _external(p) if 1 < t.nodes_per_domain < drawn}
    aligned = [c for c in range(max_cols, 0, -1) if all(c % d == 0 or d % c == 0 for d in spans)]
    cols = aligned[0] if aligned and aligned[0] * 2 > max_cols else max_cols
    cols = min(cols, cells)
    cols = math.ceil(cells / math.ceil(cells / cols)) if not spans else cols  # balance rows
    return _Grid(drawn, cols, math.ceil(cells / cols), w, h, dev_cols, dev_rows, l1, [])


def _tier(
    fabric: FabricSpec, plane: PlaneSpec, tier: TierSpec, grid: _Grid, row: tuple[float, float], l1: int, first: bool
) -> _Tier:
    """Return a tier's row of boxes (x only): sub-planes, one box per switch, or one box per domain."""
    n, npd = tier.switches_per_domain, tier.nodes_per_domain
    groups, domains = math.ceil(grid.drawn / npd), math.ceil(fabric.node_count / npd)
    if groups > MAX_DOMAIN_GROUPS:
        boxes = [(row[0], row[1], 0, f"{domains} domains × {n} {tier.name} switches")]
        return _Tier(plane, tier, boxes, 1, domains, grid.drawn)
    span = (row[1] - row[0] + NODE_GAP) / groups
    if first and l1 > 1 and n > l1 and n % l1 == 0:
        labels = [f"sub-plane {k}\n{n // l1} chips" for k in range(l1)]
    elif n * MIN_BOX_W <= span:
        labels = [f"{tier.name} {k}" for k in range(n)]
    else:
        labels = [f"{n} × {tier.name}"]
    k = len(labels)
    railed = first and 1 < k <= 8 and (k == l1 or (plane.attached == "device" and k == fabric.device.devices_per_node))
    bw = (span - NODE_GAP) / k
    boxes = [
        (row[0] + d * span + j * bw + 0.1, row[0] + d * span + (j + 1) * bw - 0.1, d, labels[j])
        for d in range(groups)
        for j in range(k)
    ]
    t = _Tier(plane, tier, boxes, groups, domains, grid.drawn, k if railed else 1)
    t.per_row = max(len(t.row_groups(grid, r)) for r in range(math.ceil(grid.drawn / grid.cols)))
    return t


def _place(pen: _Pen, t: _Tier, y_top: float) -> float:
    """Draw a tier's label and boxes below y_top; return the y of the row's bottom."""
    color = PLANE_COLORS[t.plane.kind]
    npd, n = t.tier.nodes_per_domain, t.tier.switches_per_domain
    label = f"{t.plane.name} · {t.tier.name}: {_n(n, 'switch')} per domain, {_n(t.domains, 'domain')} of "
    label += _n(npd, "node") + (f" (first {t.groups} drawn)" if 1 < t.groups < t.domains else "")
    if t.rails > 1:
        label += " · rail k of every node → " + ("sub-plane k" if "sub-plane" in t.boxes[0][3] else "switch k")
    if t.tier.oversubscription > 1:
        label += f" · {t.tier.oversubscription:g}:1 oversubscribed"
    pen.text(t.boxes[0][0], y_top, label, pt=9, va="top", color=color, weight="bold", bbox=_CLEAR)
    t.y1 = y_top - pen.u(20)
    for grp in range(t.groups if t.groups > 1 else 0):
        xs = [x for b in t.boxes if b[2] == grp for x in b[:2]]
        nodes = f"nodes {grp * npd}–{min((grp + 1) * npd, t.nodes) - 1}"
        pen.text((min(xs) + max(xs)) / 2, t.y1, nodes, pt=8, ha="center", va="top", color=color, bbox=_CLEAR)
    t.y1 -= pen.u(16) if t.groups > 1 else 0
    t.y0 = t.y1 - (FRONTEND_TIER_H if t.plane.kind == "frontend" else TIER_H)
    for x0, x1, _, text in t.boxes:
        pen.box(x0, t.y0, x1 - x0, t.y1 - t.y0, face=color + "30", edge=color, lw=1.0)
        pen.text((x0 + x1) / 2, (t.y0 + t.y1) / 2, text, pt=7.5, ha="center", va="center", clip_on=True)
    return t.y0


def _nodes(pen: _Pen, fabric: FabricSpec, g: _Grid) -> None:
    """Draw every drawn node: L1 strip, device squares split into dies, CPU markers, label, NIC marker."""
    dev, host = fabric.device, fabric.host
    for i in range(g.drawn):
        x0, top = g.x0(i), g.top(i)
        pen.box(x0, top - g.h, g.w, g.h, NODE_FACE, lw=0.9)
        y = top - PAD
        if g.l1:
            cw = (g.w - 2 * PAD) / g.l1
            for k in range(g.l1):
                pen.box(x0 + PAD + k * cw + 0.05, y - L1_H, cw - 0.1, L1_H, PLANE_COLORS["scale_up"], lw=0.3)
            y -= L1_H + 0.25
        for d in range(dev.devices_per_node):
            r, c = divmod(d, g.dev_cols)
            dx, dy = x0 + PAD + c * DEV_PITCH, y - r * DEV_PITCH - DEV
            die_w = DEV / dev.dies_per_device
            for j in range(dev.dies_per_device):
                pen.box(dx + j * die_w, dy, die_w, DEV, DEVICE_COLORS[j % 2], edge="none", lw=0)
            pen.box(dx, dy, DEV, DEV, "none", edge="black", lw=0.5)
        cy = top - g.h + PAD + CPU_H / 2
        for k in range(min(host.cpus_per_node, 8)):
            pen.patches.append(Circle((x0 + PAD + 0.25 + k * 0.6, cy), 0.24, facecolor=CPU_COLOR, edgecolor="none"))
        if fabric.plane("frontend") is not None:
            pen.box(x0 + g.w - PAD - 0.45, cy - 0.2, 0.4, 0.4, PLANE_COLORS["frontend"], lw=0.3)
        pen.text(x0 + g.w - PAD - 0.6, cy, f"node {i}", pt=7, ha="right", va="center")
    if g.drawn < fabric.node_count:
        x0, top = g.x0(g.drawn), g.top(g.drawn)
        pen.box(x0, top - g.h, g.w, g.h, "white", lw=0.9, linestyle="--")
        pen.text(x0 + g.w / 2, top - g.h / 2, f"… {fabric.node_count - g.drawn}\nmore nodes", ha="center", va="center")


def _stubs(g: _Grid, t: _Tier) -> list[float]:
    """Return the x offsets inside a node where its links to tier `t` leave the node (one per rail)."""
    if t.rails > 1 and t.rails == g.l1 and t.plane.kind == "scale_up":
        cw = (g.w - 2 * PAD) / g.l1
        return [PAD + (k + 0.5) * cw for k in range(g.l1)]
    if t.rails > 1:
        return [PAD + k * DEV_PITCH + DEV / 2 for k in range(t.rails)]
    return [g.w - PAD - 0.25] if t.plane.kind == "frontend" else [g.w / 2]


def _connect(pen: _Pen, g: _Grid, tiers: list[_Tier], side: int, lane_base: float, rail_base: int) -> None:
    """Draw rails from each node to the plane's first external tier: stubs, row buses, margin lanes, fan-in.

    side is -1 for tiers above the grid (lanes in the left margin), +1 for tiers below (right margin).
    """
    t, color = tiers[0], PLANE_COLORS[tiers[0].plane.kind]
    stubs = _stubs(g, t)
    ends: dict[tuple[int, int], float] = {}  # (group, rail) -> the lane's far y at the grid side
    for r in range(math.ceil(g.drawn / g.cols)):
        edge = g.tops[r] if side < 0 else g.tops[r] - g.h
        groups = t.row_groups(g, r)
        for j, grp in enumerate(groups):
            nodes = [i for i in g.row(r) if t.group_of(i) == grp]
            for k, sx in enumerate(stubs):
                slot = (j if side < 0 else len(groups) - 1 - j) * t.rails + k  # a group's bus passes no other's stubs
                y = edge - side * (RAIL_GAP + (rail_base + slot) * RAIL_DY)
                xs = [g.x0(i) + sx for i in nodes]
                for x in xs:
                    pen.line([(x, edge), (x, y)], color, lw=0.5)
                lx = lane_base + side * (grp * t.rails + k) * LANE_DX
                pen.line([(lx, y), (xs[-1] if side < 0 else xs[0], y)], color)
                ends[grp, k] = min(ends.get((grp, k), y), y) if side < 0 else max(ends.get((grp, k), y), y)
    for (grp, k), y_end in ends.items():
        lx = lane_base + side * (grp * t.rails + k) * LANE_DX
        far = k if side < 0 else t.rails - 1 - k
        y_dist = t.y0 - RAIL_GAP - far * RAIL_DY if side < 0 else t.y1 + RAIL_GAP + far * RAIL_DY
        pen.line([(lx, y_end), (lx, y_dist)], color)
        boxes = [b for b in t.boxes if b[2] == grp]
        targets = [boxes[k]] if t.rails > 1 else boxes
        centers = [(b[0] + b[1]) / 2 for b in targets]
        pen.line([(lx, y_dist), (min(centers) if side < 0 else max(centers), y_dist)], color)
        for cx in centers:
            pen.line([(cx, y_dist), (cx, t.y0 if side < 0 else t.y1)], color)


def _mesh(pen: _Pen, tiers: list[_Tier]) -> None:
    """Draw the full mesh of links between consecutive tiers of one plane (box to box)."""
    for low, high in itertools.pairwise(tiers):
        color = PLANE_COLORS[low.plane.kind]
        below = high.y1 < low.y0
        for a in low.boxes:
            for b in high.boxes:
                ya, yb = (low.y0, high.y1) if below else (low.y1, high.y0)
                pen.line([((a[0] + a[1]) / 2, ya), ((b[0] + b[1]) / 2, yb)], color, lw=0.4, alpha=0.45)


def _title(pen: _Pen, fabric: FabricSpec, x: float) -> None:
    """Write the title: name, counts, scale-up domain and total HBM from fabric.summary()."""
    s = fabric.summary()
    hbm = s["hbm_gib_total"]
    hbm_text = f"{hbm / 1024:.1f} TiB" if hbm >= 1024 else f"{hbm:.0f} GiB"
    head = (
        f"{s['name']}: {_n(s['node_count'], 'node')} · {s['device_count']} × {s['device_kind']} · "
        f"{_n(s['die_count'], 'die')} · {_n(s['cpu_count'], 'CPU')} · "
        f"scale-up domain {_n(s['scale_up_domain_size'], 'device')} · {hbm_text} HBM"
    )
    pen.text(x, -pen.u(12), head, pt=15, va="top", weight="bold")
    pen.text(x, -pen.u(42), s["description"], pt=10, va="top", style="italic")


def _legend(pen: _Pen, fabric: FabricSpec, x: float, y: float) -> float:
    """Write one legend line per plane, the device and the host below y; return the y of the legend's bottom."""
    lines: list[tuple[str, str]] = []
    for p in fabric.planes:
        tiers = " → ".join(f"{t.name} ({t.switches_per_domain} sw / {_n(t.nodes_per_domain, 'node')})" for t in p.tiers)
        per = "device" if p.attached == "device" else "node"
        lines.append(
            (
                PLANE_COLORS[p.kind],
                f"{p.name} [{p.kind}] · {p.protocol} · {p.bandwidth_gbs:g} GB/s per {per}, "
                f"unidirectional · tiers: {tiers}",
            )
        )
    d, h = fabric.device, fabric.host
    lines.append(
        (
            DEVICE_COLORS[0],
            f"device: {d.kind} × {d.devices_per_node} per node, "
            f"{_n(d.dies_per_device, 'die')} each, {d.hbm_gib:g} GiB HBM at {d.hbm_gbs:g} GB/s",
        )
    )
    lines.append(
        (
            CPU_COLOR,
            f"host: {h.cpus_per_node} × {h.cpu_kind} per node, {h.cores_per_cpu} cores each, {h.dram_gib:g} GiB DRAM",
        )
    )
    step, sw = pen.u(22), pen.u(14)
    for color, text in lines:
        pen.box(x, y - sw, sw * 1.6, sw, color, edge="none", lw=0)
        pen.text(x + sw * 2.2, y - sw / 2, text, pt=10, va="center")
        y -= step
    return y


def draw_comparison(rows: list[Row], path: str | pathlib.Path) -> pathlib.Path:
    """Draw published vs predicted latency against EP degree for each library and op; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    names = {"cm384": "CloudMatrix384 CANN EP (UB)", "h800": "H800 DeepEP (RDMA)"}
    for ax, op in zip(axes, ("dispatch", "combine"), strict=True):
        for library, color in (("cm384", "tab:red"), ("h800", "tab:blue")):
            mine = sorted((r for r in rows if r.library == library and r.op == op), key=lambda r: r.ep)
            eps = [r.ep for r in mine]
            ax.plot(eps, [r.published_us for r in mine], "o", color=color, label=f"{names[library]} published")
            ax.plot(eps, [r.predicted_us for r in mine], "-", color=color, label=f"{names[library]} predicted")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("EP degree (ranks)")
        ax.set_title(f"MoE {op}, 128 tokens/rank, top-8, hidden 7168")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency (us)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
