"""A run's plot: `training.png`, loss and evaluation metrics against queries and wall time.

Drawn from `metrics.jsonl` alone, so any run directory, finished or not, can be plotted
again. matplotlib is imported when a plot is drawn (seconds of import time that
`blackbox-zo --help` and `list` should not pay).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rundir import METRICS_NAME

__all__ = ["PLOT_NAME", "read_metrics", "plot_metrics"]

PLOT_NAME = "training.png"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (an empty list if there is none)."""
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(run_dir: Path) -> Path | None:
    """training.png: loss and evaluation metrics against queries and against wall time."""
    # A Figure on its own Agg canvas, not pyplot: no global backend or figure registry is touched
    # (a library call must not change the caller's matplotlib state), and pyplot's import is skipped.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r and r["loss"] == r["loss"]]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not steps:
        return None
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    fig = Figure(figsize=(10, 7 if keys else 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if keys else 1, 2, squeeze=False)
    for col, xkey, xlabel in ((0, "queries", "loss queries"), (1, "wall_s", "wall time [s]")):
        ax = axes[0][col]
        ax.plot([r[xkey] for r in steps], [r["loss"] for r in steps], lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        if all(r["loss"] > 0 for r in steps):  # e.g. a negative return as loss: keep a linear axis
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if keys:
            ax = axes[1][col]
            for k in keys:
                ax.plot([r[xkey] for r in evals if k in r], [r[k] for r in evals if k in r], marker="o", ms=3, label=k[5:])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("evaluation")
            ax.legend()
            ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).parent.name}: {Path(run_dir).name}")
    # fixed margins in inches instead of tight_layout, which lays out every tick label once more before
    # the real draw (half the plot's time, a twentieth of a default digits run)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.6 / height, top=1 - 0.5 / height, wspace=0.22,
                        hspace=0.32)
    out = Path(run_dir) / PLOT_NAME
    fig.savefig(out, dpi=110)
    return out
