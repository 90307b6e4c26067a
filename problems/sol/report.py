"""Tables and plots of a solver-in-the-loop comparison (DeepZero Fig. 6), for any simulator:
the MAE table per test run (Markdown + CSV), the table of methods x seeds, a bar chart of the
mean test MAE per method with its spread, the MAE over time, and a picture of one test run
(reference, source, corrected)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from blackbox_zo.config import resolve_config
from blackbox_zo.rundir import CHECKPOINT_NAME, atomic_write_text

from .methods import evaluate_mae

__all__ = ["COLORS", "pyplot", "run_labels", "mae_table", "seed_table", "write_table", "plot_mae_bars", "plot_mae_over_time",
           "plot_test_run", "report_single_run"]

COLORS = {"SRC": "#7f7f7f", "NON": "#ff7f0e", "FO-SOL": "#1f77b4", "ZO-SOL": "#2ca02c", "NON+ZO-SOL": "#d62728",
          "NON+ES": "#8c564b"}


def run_labels(conditions: Tensor, label: str = "Re") -> list[str]:
    """One label per test run: its condition (`Re 146.5`) when it has one number, else `run k`."""
    if conditions.dim() == 1:
        return [f"{label} {float(c):g}" for c in conditions]
    return [f"run {k}" for k in range(conditions.shape[0])]


def mae_table(mae: Mapping[str, Tensor], conditions: Tensor, extra: Mapping[str, Mapping[str, Any]] | None = None,
              label: str = "Re") -> tuple[str, list[dict[str, Any]]]:
    """Markdown table and CSV rows: per method the mean and std of the test MAE over the runs,
    each run's MAE, and any extra columns (e.g. wall time, queries)."""
    extra = extra or {}
    names = run_labels(conditions, label)
    keys = ["mae_" + n.lower().replace(" ", "_") for n in names]
    extra_keys = sorted({k for v in extra.values() for k in v})
    rows = []
    for name, values in mae.items():
        row = {"method": name, "mae_mean": float(values.mean()), "mae_std": float(values.std(unbiased=False))}
        row.update({k: float(v) for k, v in zip(keys, values)})
        row.update({k: extra.get(name, {}).get(k, "") for k in extra_keys})
        rows.append(row)
    head = ["method", "MAE mean", "MAE std"] + names + extra_keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], f"{row['mae_mean']:.4f}", f"{row['mae_std']:.4f}"]
        cells += [f"{row[k]:.4f}" for k in keys]
        cells += [_fmt(row[k]) for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


def seed_table(per_seed: Mapping[str, Mapping[int, float]], seeds: Sequence[int],
               wins: Mapping[str, str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Methods x seeds: each seed's mean test MAE, then the mean and the spread (population std)
    over the seeds; `wins` adds a column (e.g. "3/3 below SRC")."""
    rows = []
    head = ["method"] + [f"seed {s}" for s in seeds] + ["mean ± std over seeds"] + (["vs SRC"] if wins else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_seed in per_seed.items():
        values = [by_seed.get(s, math.nan) for s in seeds]
        t = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
        mean = float(t.mean()) if t.numel() else math.nan
        std = float(t.std(unbiased=False)) if t.numel() else math.nan
        row = {"method": name, **{f"seed_{s}": v for s, v in zip(seeds, values)}, "mean": mean, "std": std}
        cells = [name] + [f"{v:.4f}" if math.isfinite(v) else "–" for v in values] + [f"{mean:.4f} ± {std:.4f}"]
        if wins:
            row["vs_src"] = wins.get(name, "")
            cells.append(wins.get(name, ""))
        rows.append(row)
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


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: ~1 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mae_bars(mae: Mapping[str, Tensor], conditions: Tensor, path: Path, title: str = "", label: str = "Re") -> Path:
    """Fig. 6-like: mean test MAE per method, error bar = std over the test runs, dots = runs."""
    plt = pyplot()
    names = list(mae)
    means = [float(mae[n].mean()) for n in names]
    stds = [float(mae[n].std(unbiased=False)) for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, means, yerr=stds, capsize=6, color=[COLORS.get(n, "#9467bd") for n in names], alpha=0.85)
    markers = "osD^v<>"
    for k, run in enumerate(run_labels(conditions, label)):
        ax.scatter(range(len(names)), [float(mae[n][k]) for n in names], color="k", s=14, zorder=3,
                   marker=markers[k % len(markers)], label=run)
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
    plt = pyplot()
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


def plot_test_run(rows: Mapping[str, Tensor], path: Path, title: str = "") -> Path:
    """One test run as each method rolled it out; rows: {name: trajectory [steps+1, *state]}.

    A 1-D grid (channels, N) is drawn as a space-time image of channel 0 (x across, time up);
    a 2-D grid as channel 0 at five times; a vector state as its first entries over time.
    All panels share the colour scale of the first row (the reference).
    """
    plt = pyplot()
    first = next(iter(rows.values()))
    state_dims = first.dim() - 1
    if state_dims == 2:  # (channels, N)
        vmax = float(first[:, 0].abs().max()) or 1.0
        fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows) + 1, 3.6), squeeze=False, layout="constrained")
        for ax, (name, traj) in zip(axes[0], rows.items()):
            im = ax.imshow(traj[:, 0].numpy(), origin="lower", aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("cell")
        axes[0][0].set_ylabel("time step")
        fig.colorbar(im, ax=axes, shrink=0.8)
    elif state_dims == 3:  # (channels, nx, ny)
        t_max = first.shape[0] - 1
        times = sorted({0, t_max // 4, t_max // 2, 3 * t_max // 4, t_max})
        vmax = float(first[:, 0].abs().quantile(0.99)) or 1.0
        fig, axes = plt.subplots(len(rows), len(times), figsize=(1.3 * len(times) + 1.2, 2.3 * len(rows) + 0.4),
                                 squeeze=False, layout="constrained")
        for i, (name, traj) in enumerate(rows.items()):
            for j, t in enumerate(times):
                im = axes[i][j].imshow(traj[t, 0].T.numpy(), origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                axes[i][j].set_xticks([])
                axes[i][j].set_yticks([])
                if i == 0:
                    axes[i][j].set_title(f"t = {t}", fontsize=8)
                if j == 0:
                    axes[i][j].set_ylabel(name, fontsize=9)
        fig.colorbar(im, ax=axes, shrink=0.6)
    else:  # a vector, or a grid of more dimensions: the first entries over time
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (name, traj), color in zip(rows.items(), ["k", *COLORS.values(), "#9467bd"]):
            flat = traj.reshape(traj.shape[0], -1)
            for e in range(min(3, flat.shape[1])):
                ax.plot(flat[:, e].numpy(), color=color, lw=0.9, label=name if e == 0 else None)
        ax.set_xlabel("time step")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def report_single_run(problem, run_dir: Path) -> None:
    """After `blackbox-zo train sol` (or a preset, `train wake-flow`): this run's corrector vs SRC on
    the test runs (test_mae.md / .csv) and one test run as both roll it out (`problem.plot_test_run`)."""
    run_dir = Path(run_dir)
    raw = json.loads((run_dir / "config.json").read_text())
    warm = raw.get(problem.section, {}).get("warm_start", "none")
    raw.setdefault("sparsity", {})["enabled"] = False  # no ZO-GraSP queries just to rebuild the module
    raw.setdefault(problem.section, {})["warm_start"] = "none"  # nor a warm start: the checkpoint's weights replace it
    config = resolve_config(problem.config_model, raw, name=problem.name)
    setup = problem.setup(config, progress=False)
    state = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    setup.module.load_state_dict(state["module"])
    sim, mask = setup.extras["simulator"], setup.extras["mask"]
    test, test_cond = setup.extras["test"]
    steps = problem.settings(config).eval_steps
    kind = config.estimator.kind  # the experiment's method names: ZO-SOL is (Sparse-)CGE, NON+ES the wake default
    label = ("NON+" if warm == "non" else "") + {"autograd": "FO-SOL", "cge": "ZO-SOL"}.get(kind, kind.upper())
    mae_src, traj_src = evaluate_mae(sim, None, test, test_cond, mask, steps)
    mae_run, traj_run = evaluate_mae(sim, setup.module, test, test_cond, mask, steps)
    markdown, rows = mae_table({"SRC": mae_src, label: mae_run}, test_cond, label=problem.condition_label)
    write_table(run_dir, markdown, rows, stem="test_mae")
    t_max, k = traj_src.shape[1] - 1, problem.test_run_index(test.shape[0])
    problem.plot_test_run({"reference": test[k, : t_max + 1], "SRC": traj_src[k], label: traj_run[k]},
                          run_labels(test_cond, problem.condition_label)[k], run_dir / problem.test_run_plot,
                          problem.simulator_name(config))
