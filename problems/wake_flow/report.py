"""Tables and plots of the wake-flow comparison (DeepZero Fig. 6): MAE table (Markdown + CSV),
a bar chart of the mean test MAE per method with its spread, the MAE over time, and a
vorticity strip (reference, source, corrected) of one test run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from blackbox_zo.config import resolve_config
from blackbox_zo.rundir import CHECKPOINT_NAME, atomic_write_text
from oracles.wake_flow import vorticity

from .methods import evaluate_mae

__all__ = ["mae_table", "write_table", "plot_mae_bars", "plot_mae_over_time", "plot_vorticity_strip",
           "report_single_run"]

COLORS = {"SRC": "#7f7f7f", "NON": "#ff7f0e", "FO-SOL": "#1f77b4", "ZO-SOL": "#2ca02c"}


def mae_table(mae: Mapping[str, Tensor], test_re: Tensor, extra: Mapping[str, Mapping[str, Any]] | None = None
              ) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table and CSV rows: per method the mean and std of the test MAE over the runs,
    each run's MAE, and any extra columns (e.g. wall time, queries)."""
    extra = extra or {}
    res = [f"{float(r):g}" for r in test_re]
    extra_keys = sorted({k for v in extra.values() for k in v})
    rows = []
    for name, values in mae.items():
        row = {"method": name, "mae_mean": float(values.mean()), "mae_std": float(values.std(unbiased=False))}
        row.update({f"mae_re_{r}": float(v) for r, v in zip(res, values)})
        row.update({k: extra.get(name, {}).get(k, "") for k in extra_keys})
        rows.append(row)
    head = ["method", "MAE mean", "MAE std"] + [f"Re {r}" for r in res] + extra_keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], f"{row['mae_mean']:.4f}", f"{row['mae_std']:.4f}"]
        cells += [f"{row[f'mae_re_{r}']:.4f}" for r in res]
        cells += [_fmt(row[k]) for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def write_table(out_dir: Path, markdown: str, rows: list[dict[str, Any]], stem: str = "results") -> None:
    atomic_write_text(Path(out_dir) / f"{stem}.md", markdown)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(out_dir) / f"{stem}.csv", buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mae_bars(mae: Mapping[str, Tensor], test_re: Tensor, path: Path, title: str = "") -> Path:
    """Fig. 6-like: mean test MAE per method, error bar = std over the test runs, dots = runs."""
    plt = _plt()
    names = list(mae)
    means = [float(mae[n].mean()) for n in names]
    stds = [float(mae[n].std(unbiased=False)) for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, means, yerr=stds, capsize=6, color=[COLORS.get(n, "#9467bd") for n in names], alpha=0.85)
    markers = "osD^v<>"
    for k, re in enumerate(test_re.tolist()):
        ax.scatter(range(len(names)), [float(mae[n][k]) for n in names], color="k", s=14, zorder=3,
                   marker=markers[k % len(markers)], label=f"Re {re:g}")
    for i, m in enumerate(means):
        ax.annotate(f"{m:.4f}", (i, m), ha="left", va="bottom", fontsize=8, xytext=(14, 2), textcoords="offset points")
    ax.set_ylabel("test MAE vs high fidelity (mean over steps)")
    ax.set_title(title or "Wake flow: corrected low-fidelity error (bars: mean +- std over test runs)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_mae_over_time(curves: Mapping[str, Tensor], path: Path) -> Path:
    """MAE (mean over the test runs) at each step of the rollout, per method. curves: {name: [R, steps]}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in curves.items():
        ax.plot(range(1, c.shape[1] + 1), c.mean(0).tolist(), label=name, color=COLORS.get(name))
    ax.set_xlabel("time step after the start frame")
    ax.set_ylabel("MAE (mean over test runs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_vorticity_strip(rows: Mapping[str, Tensor], dx: float, times: list[int], path: Path, title: str = "") -> Path:
    """Rows of vorticity snapshots (one row per trajectory [steps+1, 2, nx+1, ny+1]) at `times`.

    Flow goes up (+y); every panel shares one symmetric colour scale taken from the first
    row (the reference), so a damped wake looks pale and a wrong one looks wrong.
    """
    plt = _plt()
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
