"""Stacked-edit curves: how a sequential run's scores move with the number of edits, one PNG per run.

Each row of `kbsync eval --sequential` (editor.evaluate.run_sequential) carries a "curve": the
stacked model scored after 10, 25, ... edits and at the end. One panel per score, one line per
method. Free generation (the greedy answer under the match rules) is the headline: kept and
paraphrases are greedy answers; retain is the share of unrelated prompts whose greedy answer is
unchanged; deterioration is the share of known facts the stack broke.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (curve key, panel title, y range): the headline scores first; all are shares.
PANELS = (
    ("kept_em", "edits still answered (greedy)", (0.0, 1.02)),
    ("equiv_em", "paraphrases answered (greedy)", (0.0, 1.02)),
    ("retain_acc", "unrelated answers unchanged (greedy)", (0.0, 1.02)),
    ("deterioration", "known facts broken", (0.0, 1.02)),
)


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write the runs' curves (one line per method, one panel per score) as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), squeeze=False)
    for ax, (key, name, (lo, hi)) in zip(axes[0], PANELS):
        for row in rows:
            points = [(p["edits"], p[key]) for p in row.get("curve", []) if not math.isnan(p.get(key, math.nan))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=row["method"])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 10, 100, 1000 rather than 10^1 ...
        ax.set_xlabel("edits stacked")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(lo, hi)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
