"""`blackbox-zo compare RUN_DIR...`: runs overlaid in one figure, their summaries in one table.

Everything is read from the run directories (config.json, metrics.jsonl, summary.json), so
finished, stopped and still-running runs compare alike. Each run is labelled by the settings in
which its config.json differs from the others' (bookkeeping settings such as `run.out_dir`
left out), or by its directory's name when none differ. The table has, per run: how it
stopped, its steps, the final value of the compared metric (the problem's headline metric, or
`--metric`), the queries and the wall time, and with `--target` the queries it took to reach
that value. It is written as compare.md, compare.csv and compare.png (the metric and the
training loss against queries and against wall time) to `--out` (default
runs/compare/<timestamp>/), nothing before every run has been read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import rundir
from .plots import read_metrics

__all__ = ["CompareError", "ComparedRun", "Comparison", "IGNORED_SETTINGS", "load_run", "compare_runs",
           "write_comparison", "lower_is_better", "headline_metrics"]

# settings that do not change what a run computes: never what tells two runs apart
IGNORED_SETTINGS = ("run.out_dir", "run.progress", "run.loggers", "run.checkpoint_every_steps")
COLUMNS = ("run", "label", "problem", "stopped", "steps", "metric", "final", "queries", "wall_s",
           "target", "queries_to_target")


class CompareError(rundir.RunDirError):
    """A run directory that cannot be compared, or runs that should not be (one line; exit 2)."""


@dataclass
class ComparedRun:
    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    label: str = ""

    @property
    def problem(self) -> str:
        return str(self.config.get("problem") or "?")

    def curve(self, metric: str) -> list[tuple[int, float, float]]:
        """(queries, wall_s, value) of `metric`: the training loss per step, or an evaluation metric."""
        key = "loss" if metric == "loss" else f"eval/{metric}"
        return [(int(r["queries"]), float(r.get("wall_s", math.nan)), float(r[key])) for r in self.records
                if key in r and isinstance(r[key], (int, float)) and (key != "loss" or "step" in r)]

    def final(self, metric: str) -> float | None:
        if self.summary is not None and metric in self.summary and isinstance(self.summary[metric], (int, float)):
            return float(self.summary[metric])
        points = self.curve(metric)
        return points[-1][2] if points else None

    @property
    def queries(self) -> int | None:
        if self.summary is not None:
            return int(self.summary["queries"]["total"])
        return int(self.records[-1]["queries"]) if self.records else None

    @property
    def wall_s(self) -> float | None:
        if self.summary is not None:
            return float(self.summary["wall_s"])
        return float(self.records[-1].get("wall_s", math.nan)) if self.records else None

    @property
    def steps(self) -> int:
        if self.summary is not None:
            return int(self.summary["steps"])
        return max((int(r["step"]) for r in self.records), default=0)

    @property
    def stopped(self) -> str:
        return str(self.summary.get("stopped")) if self.summary is not None else "no summary.json (still running, or killed)"


@dataclass
class Comparison:
    runs: list[ComparedRun]
    metric: str
    lower_is_better: bool
    differing: list[str]
    target: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def lower_is_better(metric: str) -> bool:
    """A loss, an error, a regret: lower is better; an accuracy, a return, a radius: higher."""
    name = metric.lower()
    return any(word in name for word in ("loss", "err", "mse", "mae", "regret", "nll", "perplexity"))


def load_run(run_dir: Path) -> ComparedRun:
    run_dir = Path(run_dir)
    try:
        config = rundir.read_run_config(run_dir)
    except rundir.RunDirError as exc:
        raise CompareError(str(exc)) from None
    metrics = run_dir / rundir.METRICS_NAME
    if not metrics.is_file():
        raise CompareError(f"{run_dir} has no {rundir.METRICS_NAME} (the run stopped before its first step)")
    try:
        records = read_metrics(run_dir)
    except ValueError:  # a torn last line of a run killed mid-write: the lines before it
        lines = metrics.read_text().splitlines()
        try:
            records = [json.loads(line) for line in lines[:-1] if line.strip()]
        except ValueError as exc:
            raise CompareError(f"{metrics} is damaged: {exc}") from None
    summary = None
    path = run_dir / rundir.SUMMARY_NAME
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except ValueError as exc:
            raise CompareError(f"{path} is damaged: {exc}") from None
    return ComparedRun(run_dir, config, records, summary)


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _labels(runs: Sequence[ComparedRun]) -> list[str]:
    flats = [_flat(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if k not in IGNORED_SETTINGS
                 and len({json.dumps(f.get(k, "(unset)"), sort_keys=True) for f in flats}) > 1]
    # a setting one run does not have (another estimator's q) is left out of its label
    labels = [", ".join(f"{k}={_show(f[k])}" for k in differing if k in f) or r.run_dir.name
              for r, f in zip(runs, flats)]
    if len(set(labels)) < len(labels):  # the same settings twice (a rerun): the directory tells them apart
        labels = [f"{label} ({r.run_dir.name})" if labels.count(label) > 1 else label for r, label in zip(runs, labels)]
    for run, label in zip(runs, labels):
        run.label = label
    return differing


def compare_runs(run_dirs: Sequence[Path], metric: str | None = None, target: float | None = None,
                 goal: str | None = None, force: bool = False, headline: dict[str, str] | None = None) -> Comparison:
    """Read every run, refuse runs of different problems (unless `force`), label them, build the table.

    `headline` maps a problem to its headline metric (the CLI asks the registry); without `metric`
    the compared metric is the first run's problem's headline if the runs evaluated it, else "loss".
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    problems = sorted({r.problem for r in runs})
    if len(problems) > 1 and not force:
        shown = ", ".join(f"{r.run_dir} is {r.problem}" for r in runs)
        raise CompareError(f"runs of different problems ({shown}); compare them anyway with --force")
    if metric is None:
        candidate = (headline or {}).get(runs[0].problem)
        metric = candidate if candidate and any(run.curve(candidate) for run in runs) else "loss"
    elif not any(run.curve(metric) for run in runs):
        known = sorted({k[5:] for run in runs for r in run.records for k in r if k.startswith("eval/")})
        raise CompareError(f"--metric {metric!r}: no run recorded it (recorded: loss"
                           f"{', ' + ', '.join(known) if known else ''})")
    lower = lower_is_better(metric) if goal is None else goal == "min"
    differing = _labels(runs)
    comparison = Comparison(runs, metric, lower, differing, target)
    for run in runs:
        reached = None
        if target is not None:
            reached = next((q for q, _, v in run.curve(metric) if (v <= target if lower else v >= target)), None)
        comparison.rows.append({
            "run": str(run.run_dir), "label": run.label, "problem": run.problem, "stopped": run.stopped,
            "steps": run.steps, "metric": metric, "final": run.final(metric), "queries": run.queries,
            "wall_s": run.wall_s, "target": target, "queries_to_target": reached})
    return comparison


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _markdown(c: Comparison) -> str:
    goal = "lower is better" if c.lower_is_better else "higher is better"
    lines = [f"# Comparison of {len(c.runs)} runs ({', '.join(sorted({r.problem for r in c.runs}))})", "",
             f"Metric: `{c.metric}` ({goal}; the final value is summary.json's, else the last recorded)."
             + (f" Target: {c.target:g}." if c.target is not None else ""),
             "Settings that differ: " + (", ".join(f"`{k}`" for k in c.differing) or "none") + ".", ""]
    head = ["run", "label", "stopped", "steps", f"final {c.metric}", "queries", "wall [s]"]
    if c.target is not None:
        head.append(f"queries to {c.metric} {'<=' if c.lower_is_better else '>='} {c.target:g}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in c.rows:
        cells = [Path(row["run"]).name, row["label"], row["stopped"], row["steps"], row["final"], row["queries"],
                 row["wall_s"]]
        if c.target is not None:
            cells.append(row["queries_to_target"] if row["queries_to_target"] is not None else "not reached")
        lines.append("| " + " | ".join(_cell(v) for v in cells) + " |")
    lines += ["", "Run directories:", ""] + [f"* `{row['run']}`" for row in c.rows]
    return "\n".join(lines) + "\n"


def _csv(c: Comparison) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in c.rows:
        writer.writerow({k: ("" if row[k] is None else repr(row[k]) if isinstance(row[k], float) else row[k])
                         for k in COLUMNS})
    return buf.getvalue()


def _figure(c: Comparison) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c.metric] + (["loss"] if c.metric != "loss" else [])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 4 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, (index, xlabel) in enumerate(((0, "loss queries"), (1, "wall time [s]"))):
            ax = axes[row][col]
            for run in c.runs:
                points = run.curve(metric)
                if points:
                    ax.plot([p[index] for p in points], [p[2] for p in points], lw=1,
                            marker="o" if metric != "loss" else None, ms=3, label=run.label)
            if c.target is not None and metric == c.metric:
                ax.axhline(c.target, color="grey", ls="--", lw=0.8, label=f"target {c.target:g}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss" if metric == "loss" else metric)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(", ".join(sorted({r.problem for r in c.runs})))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_comparison(c: Comparison, out_dir: Path) -> dict[str, Path]:
    """compare.md, compare.csv and compare.png in `out_dir` (each written whole, atomically)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise rundir.WriteError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    png = _figure(c)
    paths = {"md": out_dir / "compare.md", "csv": out_dir / "compare.csv", "png": out_dir / "compare.png"}
    rundir.atomic_write_text(paths["md"], _markdown(c))
    rundir.atomic_write_text(paths["csv"], _csv(c))
    rundir.atomic_write_bytes(paths["png"], lambda fh: fh.write(png))
    return paths


def headline_metrics(problems: Sequence[str], lookup: Any) -> dict[str, str]:
    """problem -> its headline metric, for the problems `lookup` (get_problem) knows."""
    out = {}
    for name in problems:
        try:
            out[name] = lookup(name).headline_metric
        except Exception:  # noqa: BLE001 - a plug-in gone since, or broken: compare by the loss
            continue
    return out
