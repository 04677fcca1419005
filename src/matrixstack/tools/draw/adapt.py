"""Draw a dataset's row lengths in tokens: a histogram of prompt, completion and total tokens per row."""

from __future__ import annotations

from pathlib import Path


def draw_length_histogram(
    title: str, prompt_lengths: list[int], completion_lengths: list[int], percentiles: dict[str, int], path: str | Path
) -> Path:
    """Draw the histogram of tokens per row (prompt, completion and total) with the total's percentiles marked
    (`{"p50": n, ...}`); return the written PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = [p + c for p, c in zip(prompt_lengths, completion_lengths, strict=True)]
    top = max(totals)
    bins = range(0, top + max(1, top // 60) + 1, max(1, top // 60))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for lengths, label, color in (
        (prompt_lengths, "prompt", "tab:blue"),
        (completion_lengths, "completion", "tab:orange"),
        (totals, "total", "tab:green"),
    ):
        ax.hist(lengths, bins=bins, histtype="step", lw=1.6, color=color, label=label)
    for (name, value), style in zip(percentiles.items(), (":", "--", "-.", "-"), strict=False):
        ax.axvline(value, color="grey", ls=style, lw=1, label=f"total {name} = {value}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
