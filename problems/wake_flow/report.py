"""Tables and plots of the wake-flow comparison (DeepZero Fig. 6): MAE table (Markdown + CSV),
a bar chart of the mean test MAE per method with its spread, the MAE over time (all three the
generic ones of problems/sol/report.py), and a vorticity strip (reference, source, corrected)
of one test run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from blackbox_zo.config import resolve_config
from blackbox_zo.rundir import CHECKPOINT_NAME, atomic_write_text
from oracles.wake_flow import vorticity
# The generic tables and plots (the wake flow's condition is the Reynolds number, "Re").
from problems.sol.report import COLORS, mae_table, plot_mae_bars, plot_mae_over_time, pyplot, write_table  # noqa: F401

from .methods import evaluate_mae

__all__ = ["mae_table", "write_table", "plot_mae_bars", "plot_mae_over_time", "plot_vorticity_strip",
           "report_single_run"]


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


def report_single_run(problem, run_dir: Path) -> None:
    """After `blackbox-zo train wake-flow`: this run's corrector vs SRC on the test runs."""
    run_dir = Path(run_dir)
    raw = json.loads((run_dir / "config.json").read_text())
    raw.setdefault("sparsity", {})["enabled"] = False  # no ZO-GraSP queries just to rebuild the module
    config = resolve_config(problem.config_model, raw, name=problem.name)
    setup = problem.setup(config, progress=False)
    state = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    setup.module.load_state_dict(state["module"])
    data, sim = setup.extras["data"], setup.extras["simulator"]
    steps = config.wake.eval_steps
    label = "FO-SOL" if config.estimator.kind == "autograd" else "ZO-SOL"
    mae_src, traj_src = evaluate_mae(sim, None, data.test, data.test_re, sim.mask, steps)
    mae_run, traj_run = evaluate_mae(sim, setup.module, data.test, data.test_re, sim.mask, steps)
    markdown, rows = mae_table({"SRC": mae_src, label: mae_run}, data.test_re)
    write_table(run_dir, markdown, rows, stem="test_mae")
    k = data.test.shape[0] // 2
    t_max = traj_src.shape[1] - 1
    times = sorted({0, t_max // 4, t_max // 2, 3 * t_max // 4, t_max})
    plot_vorticity_strip({"reference": data.test[k, : t_max + 1], "SRC": traj_src[k], label: traj_run[k]},
                         sim.geometry.dx, times, run_dir / "vorticity.png",
                         title=f"test run Re = {float(data.test_re[k]):g}")
