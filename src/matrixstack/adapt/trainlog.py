"""What a tune job leaves to read and look at: the JSON log of its steps and the loss curve as a PNG.

`write_log(path, history, summary)` writes {"summary": ..., "steps": [{step, loss, tokens, step_s, cpu_s}, ...]};
`draw_loss(path, history, title)` draws the training loss per step (matplotlib, Agg). Both write a temporary
file first and rename it, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_log(path: Path, history: list[dict[str, float]], summary: dict[str, Any]) -> None:
    """Write the job's JSON log at `path`."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"summary": summary, "steps": history}, indent=2) + "\n")
    os.replace(partial, path)


def draw_loss(path: Path, history: list[dict[str, float]], title: str) -> None:
    """Draw the loss per step of `history` as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png", dpi=100)
    plt.close(fig)
    os.replace(partial, path)
