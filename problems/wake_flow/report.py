"""The wake flow's picture of one test run: a vorticity strip (reference, source, corrected).
The tables, bar charts and MAE-over-time plots are the generic ones (problems/sol/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor

from oracles.wake_flow import vorticity
from problems.sol.report import pyplot

__all__ = ["plot_vorticity_strip"]


def plot_vorticity_strip(rows: Mapping[str, Tensor], dx: float, times: list[int], path: Path, title: str = "") -> Path:
    """Rows of vorticity snapshots (one row per trajectory [steps+1, 2, nx+1, ny+1]) at `times`.

    Flow goes up (+y); every panel shares one symmetric colour scale taken from the first
    row (the reference), so a damped wake looks pale and a wrong one looks wrong.
    """
    plt = pyplot()
    vort = {name: vorticity(traj[times], dx) for name, traj in rows.items()}
    first = next(iter(vort.values()))
    vmax = float(first.abs().quantile(0.99)) or 1.0
    n_rows, n_cols = len(vort), len(times)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 1.2, 2.5 * n_rows + 0.4), squeeze=False,
                             layout="constrained")
    for i, (name, v) in enumerate(vort.items()):
        for j, t in enumerate(times):
            ax = axes[i][j]
            im = ax.imshow(v[j].T.numpy(), origin="lower", extent=(dx, 100 - dx, dx, 200 - dx), cmap="RdBu_r",
                           vmin=-vmax, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t = {t}", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="vorticity")
    fig.suptitle(title or "vorticity", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
