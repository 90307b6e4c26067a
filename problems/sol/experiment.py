"""`blackbox-zo experiment sol`: SRC / NON / ZO-SOL (and FO-SOL) for any simulator, over seeds.

Also `blackbox-zo experiment wake-flow`: the same experiment on a preset of the sol problem
(`main(argv, problem=WakeFlowProblem())`), with the preset's settings section, data and pictures.

For the simulator of `sol.simulator` and its reference trajectories: SRC (the solver alone),
NON (first-order on pre-generated one-step pairs, outside the loop), ZO-SOL (eq. (A3) by loss
values only, through the trainer) and, when the simulator declares itself differentiable,
FO-SOL (eq. (A3) backpropagated through it). These run on the problem's defaults <-
`problem.experiment_settings` (the wake flow pins DeepZero's Sparse-CGE there, its default
method being another). On request: NON+ZO-SOL (ZO-SOL from NON's corrector) and, for a preset
whose default method is NON+ES (the wake flow), NON+ES: the problem's own default run
(`blackbox-zo train NAME`, with --paper-scale, --quick and --set on top). Asking for FO-SOL
with a non-differentiable simulator is refused in one line before anything runs. FO-SOL and
ZO-SOL share the config, the initial corrector, the batches, the optimizer and the number of
steps.

`--seeds 0,1,2` repeats the trained methods for each seed (SRC has no seed) and reports each
seed's mean test MAE and the mean and spread over the seeds. Every finished (method, seed)
is cached in the output directory (`seed<S>/<method>.json` and its weights `.pt`, keyed by
the settings), so an interrupted study run again with the same `--out` continues where it
stopped.

Writes to `runs/<problem>-experiment/<timestamp>/` (or `--out`): results.md / results.csv (the
methods x seeds table, then each seed's per-run table), mae_bars.png (mean over seeds, spread
over seeds, a dot per seed), mae_over_time.png and test_run.png (first seed; the wake flow: vorticity.png),
summary.json, and the trainer's run directories `seed<S>/zo-sol/`, `seed<S>/fo-sol/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from blackbox_zo.config import ConfigError, deep_merge, parse_overrides, resolve_config
from blackbox_zo.problem import ProblemSetupError
from blackbox_zo.rng import seed_everything
from blackbox_zo.rundir import atomic_write_text, make_run_dir
from blackbox_zo.trainer import Trainer
from problems.experiments.timing import PhaseClock

from .data import WindowBatches
from .methods import evaluate_mae, mae_per_step, one_step_pairs, train_non
from .problem import SolProblem
from .report import COLORS, mae_table, plot_mae_over_time, pyplot, run_labels, seed_table, write_table

METHODS = ("SRC", "NON", "FO-SOL", "ZO-SOL", "NON+ZO-SOL", "NON+ES")
DEFAULT_METHODS = ("SRC", "NON", "FO-SOL", "ZO-SOL")  # the paper's four (DeepZero Fig. 6); the others on request
# What each trained-in-the-loop method sets `warm_start` to, whatever the config says: the paper's FO-SOL and
# ZO-SOL start from the initial corrector, NON+ZO-SOL and NON+ES from NON's (`sol.warm_start=non`, docs/sol.md).
WARM_START = {"FO-SOL": "none", "ZO-SOL": "none", "NON+ZO-SOL": "non", "NON+ES": "non"}
# A problem's own default run, when it is not ZO-SOL (`SolProblem.default_method`: the wake flow's NON+ES)
OWN_DEFAULT = ("NON+ES",)


def allowed_methods(problem: SolProblem) -> list[str]:
    """METHODS, NON+ES only for a problem whose default run it is."""
    return [m for m in METHODS if m not in OWN_DEFAULT or m == problem.default_method]


def build_parser(problem: SolProblem) -> argparse.ArgumentParser:
    name, section = problem.name, problem.section
    p = argparse.ArgumentParser(
        prog=f"blackbox-zo experiment {name}",
        description=f"{problem.description}. SRC / NON / ZO-SOL, and FO-SOL when the simulator "
                    f"is differentiable; test MAE per method and seed, plots (DeepZero Sec. 6.2, Fig. 6). Settings "
                    f"are the {name} problem's (`blackbox-zo train {name} --help`); --set applies to every run.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting, e.g. --set {section}.unroll=4 --set optimizer.lr=3e-4")
    p.add_argument("--config", help="TOML or JSON file with settings")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(allowed_methods(problem))} "
                        f"(default: {', '.join(DEFAULT_METHODS)}, FO-SOL only for a differentiable simulator); NON+ZO-SOL "
                        "is ZO-SOL started from NON's corrector" + (
                            f"; {problem.default_method} is `blackbox-zo train {name}`'s default run"
                            if problem.default_method else ""))
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: run.seed)")
    p.add_argument("--non-steps", type=int, default=None,
                   help="NON: Adam steps on one-step pairs (default: the SOL runs' steps)")
    p.add_argument("--non-batch", type=int, default=None,
                   help="NON: pairs per step (default: windows x unroll, the (state, target) pairs of one SOL step)")
    p.add_argument("--out", help=f"output directory (default: runs/{name}-experiment/<timestamp>); "
                                 "finished (method, seed) runs found there are reused")
    p.add_argument("--quick", action="store_true", help="tiny data and few steps (smoke run)")
    if problem.paper_scale is not None:
        p.add_argument("--paper-scale", action="store_true",
                       help="DeepZero Appx. H settings (" + ", ".join(f"{k}={v}" for k, v in problem.paper_scale.items())
                            + "): a GPU job; --set still applies on top")
    p.add_argument("--no-progress", action="store_true")
    return p


def _config_key(config, method: str, seed: int, extra: dict[str, Any]) -> str:
    raw = json.loads(config.model_dump_json())
    raw["run"] = {k: v for k, v in raw["run"].items() if k not in ("progress", "out_dir", "threads")}
    raw["run"]["seed"] = seed
    blob = json.dumps({"config": raw, "method": method, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_sol(problem, config, run_dir: Path, label: str):
    """The trainer on the problem, keeping the module (the experiment evaluates it itself)."""
    seed_everything(config.run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=2) + "\n")
    setup = problem.setup(config)
    setup.evaluate = None
    summary = Trainer(setup, config, run_dir, problem_name=f"{problem.name} {label}").fit()
    summary["sparsity"] = setup.extras.get("sparsity")
    return setup.module, summary


def _paper_scale(args: argparse.Namespace, problem: SolProblem) -> list[str]:
    if getattr(args, "paper_scale", False):
        return [f"{k}={json.dumps(v)}" for k, v in problem.paper_scale.items()]
    return []


def resolve(args: argparse.Namespace, problem: SolProblem):
    """The config and the method list, checked before anything runs (FO-SOL refused here).

    The config is ZO-SOL's (and NON's, FO-SOL's, NON+ZO-SOL's): the problem's defaults <-
    `problem.experiment_settings` <- --config <- --paper-scale, --quick, --set."""
    defaults = deep_merge(problem.default_config(), problem.experiment_settings)
    base = problem.resolve_config(args.config, args.set, base=defaults)
    overrides = _paper_scale(args, problem) + list(args.set)
    if args.quick:
        overrides = problem.quick_overrides(base) + overrides
    if args.no_progress:
        overrides.append("run.progress=false")
    config = problem.resolve_config(args.config, overrides, base=defaults)
    differentiable = problem.differentiable(config)
    if args.methods is None:
        methods = [m for m in DEFAULT_METHODS if m != "FO-SOL" or differentiable]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if "FO-SOL" in methods and not differentiable:
            raise ConfigError(f"FO-SOL needs a differentiable simulator; {problem.simulator_name(config)!r} declares "
                              "differentiable=False (no gradient exists to backpropagate): drop FO-SOL from "
                              "--methods, ZO-SOL trains through it by loss values")
    seeds = [config.run.seed] if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    return config, methods, seeds


def default_run_config(args: argparse.Namespace, problem: SolProblem):
    """NON+ES: the problem's own default run (`blackbox-zo train NAME`) <- --config <- --set, with
    --paper-scale and --quick applied under the user's settings as defaults (a setting the default
    method does not use, such as ZO-GraSP's q with sparsity off, is dropped rather than refused)."""
    defaults = problem.default_config()
    under = _paper_scale(args, problem)
    if args.quick:
        under = problem.quick_overrides(problem.resolve_config(args.config, args.set)) + under
    overrides = list(args.set) + (["run.progress=false"] if args.no_progress else [])
    config = problem.resolve_config(args.config, overrides, base=deep_merge(defaults, parse_overrides(under)))
    problem.settings(config).warm_start = WARM_START["NON+ES"]
    return config


def method_config(config, name: str, problem: SolProblem, own_default=None):
    """The config one trained method runs on: `config` (ZO-SOL's) with the method's warm start (a --set
    warm_start does not apply), FO-SOL's estimator, or NON+ES's own default run (`own_default`)."""
    if name in OWN_DEFAULT:
        return own_default
    method = config
    if name in WARM_START:  # the method decides where it starts
        method = config.model_copy(deep=True)
        problem.settings(method).warm_start = WARM_START[name]
    if name == "FO-SOL":  # the first-order reference takes no mu, scheme or sparsity
        method = resolve_config(problem.config_model, method.model_dump(), None, ["estimator=autograd"],
                                name=problem.name)
    return method


def run(args: argparse.Namespace, problem: SolProblem | None = None) -> dict[str, Any]:
    problem = problem or SolProblem()
    config, methods, seeds = resolve(args, problem)
    own_default = default_run_config(args, problem) if any(m in OWN_DEFAULT for m in methods) else None
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    out = Path(args.out) if args.out else make_run_dir(config.run.out_dir, f"{problem.name}-experiment")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.model_dump_json(indent=2) + "\n")
    s, progress = problem.settings(config), config.run.progress
    simulator = problem.simulator_name(config)
    log = print if progress else (lambda *a, **k: None)

    with PhaseClock() as clock:
        parts = problem.build(config, progress, log=log)
    info = parts["data_info"]
    timing: dict[str, Any] = {"data": {"wall_s": clock.wall_s, "cpu_s": clock.cpu_s, "cached": info["cached"]}}
    log(f"data: {info['source']} {info['path']} ({'cached' if info['cached'] else 'generated'}, "
        f"wall {clock.wall_s:.1f}s, cpu {clock.cpu_s:.1f}s)")
    sim, mask, weight = parts["simulator"], parts["mask"], parts["weight"]
    train, train_cond = parts["train"]
    test, test_cond = parts["test"]
    sol_steps = config.run.epochs * WindowBatches(train, train_cond, s.unroll, s.windows,
                                                  batches_per_epoch=s.batches_per_epoch).num_batches(0)
    sol_steps = min(sol_steps, config.run.max_steps or sol_steps)
    non_steps = sol_steps if args.non_steps is None else args.non_steps
    non_batch = s.windows * s.unroll if args.non_batch is None else args.non_batch

    mae: dict[int, dict[str, torch.Tensor]] = {seed: {} for seed in seeds}
    trajs: dict[str, torch.Tensor] = {}
    extra: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in seeds}
    summaries: dict[str, Any] = {}
    first = seeds[0]

    def evaluate(name: str, corrector, seed: int) -> torch.Tensor:
        with PhaseClock() as c:
            values, traj = evaluate_mae(sim, corrector, test, test_cond, mask, s.eval_steps)
        timing.setdefault(f"{name}/seed{seed}", {}).update({"eval_wall_s": c.wall_s, "eval_cpu_s": c.cpu_s})
        if seed == first:
            trajs[name] = traj
        log(f"{name} (seed {seed}): test MAE {float(values.mean()):.5f} +- {float(values.std(unbiased=False)):.5f}")
        return values

    if "SRC" in methods:
        src = evaluate("SRC", None, first)
        for seed in seeds:
            mae[seed]["SRC"] = src
    pairs = None
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        for name in [m for m in METHODS[1:] if m in methods]:
            trained = method_config(config, name, problem, own_default)
            key = _config_key(trained, name, seed, {"non_steps": non_steps, "non_batch": non_batch}
                              if name == "NON" else {})
            slug = name.lower().replace("+", "-")
            record_path, weights_path = seed_dir / f"{slug}.json", seed_dir / f"{slug}.pt"
            corrector = parts["new_corrector"](seed)
            cached = None
            if record_path.exists() and weights_path.exists():
                record = json.loads(record_path.read_text())
                if record.get("key") == key:
                    cached = record
            if cached is not None:
                corrector.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
                summaries[f"{name}/seed{seed}"] = cached["summary"]
                timing[f"{name}/seed{seed}"] = dict(cached["timing"], cached=True)
                log(f"{name} (seed {seed}): reusing the finished run in {seed_dir}")
            else:
                with PhaseClock() as c:
                    if name == "NON":
                        seed_everything(seed)
                        if pairs is None:
                            pairs = one_step_pairs(sim, train, train_cond, max_batch=s.max_batch)
                        non_log = train_non(corrector, pairs, weight, steps=non_steps, lr=config.optimizer.lr,
                                            batch_size=non_batch, seed=seed, progress=progress)
                        summary = {"steps": non_steps, "batch": non_batch,
                                   "final_loss": non_log[-1]["loss"] if non_log else None}
                    else:
                        cfg = trained.model_copy(deep=True)
                        cfg.run.seed = seed
                        corrector, summary = _train_sol(problem, cfg, seed_dir / slug, name)
                summaries[f"{name}/seed{seed}"] = summary
                timing[f"{name}/seed{seed}"] = {"train_wall_s": c.wall_s, "train_cpu_s": c.cpu_s}
            values = evaluate(name, corrector, seed)
            mae[seed][name] = values
            by_queries = name.endswith("ZO-SOL") or name in OWN_DEFAULT
            queries = summaries[f"{name}/seed{seed}"].get("queries", {}).get("total") if by_queries else None
            t = timing[f"{name}/seed{seed}"]
            extra[seed][name] = {"train_wall_s": round(t.get("train_wall_s", 0.0), 1),
                                 "train_cpu_s": round(t.get("train_cpu_s", 0.0), 1),
                                 **({"queries": queries} if queries is not None else {})}
            if cached is None:
                torch.save(corrector.state_dict(), weights_path)
                atomic_write_text(record_path, json.dumps(
                    {"key": key, "method": name, "seed": seed, "mae": values.tolist(),
                     "summary": summaries[f"{name}/seed{seed}"], "timing": timing[f"{name}/seed{seed}"]},
                    indent=2, default=str) + "\n")

    label = problem.condition_label
    order = [m for m in METHODS if m in methods]
    per_seed = {m: {seed: float(mae[seed][m].mean()) for seed in seeds} for m in order}
    wins = None
    if "SRC" in order:
        wins = {m: f"{sum(per_seed[m][sd] < per_seed['SRC'][sd] for sd in seeds)}/{len(seeds)} seeds below SRC"
                for m in order if m != "SRC"}
    table, seed_rows = seed_table(per_seed, seeds, wins)
    sections = [f"# {simulator}: test MAE, methods x seeds\n", table]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        md, r = mae_table({m: mae[seed][m] for m in order}, test_cond, extra[seed], label=label)
        sections += [f"\n## seed {seed}: per test run\n", md]
        rows += [{"seed": seed, **row} for row in r]
    markdown = "\n".join(sections)
    write_table(out, markdown, rows)
    _plot_seed_bars(per_seed, seeds, out / "mae_bars.png",
                    title=f"{simulator}: mean test MAE over {len(seeds)} seed(s) (bars: mean +- std over seeds)")
    plot_mae_over_time({n: mae_per_step(t, test, mask) for n, t in trajs.items()}, out / "mae_over_time.png")
    t_max, k = trajs[next(iter(trajs))].shape[1] - 1, problem.test_run_index(test.shape[0])
    problem.plot_test_run({"reference": test[k, : t_max + 1], **{n: t[k] for n, t in trajs.items()}},
                          run_labels(test_cond, label)[k], out / problem.test_run_plot, f"{simulator}, seed {first}")
    # this invocation's time: the training of reused runs is not counted again
    spent = lambda v, k: k.endswith("_s") and not (v.get("cached") and k.startswith("train"))  # noqa: E731
    total_wall = sum(v[k] for v in timing.values() for k in v if spent(v, k) and k.endswith("wall_s"))
    total_cpu = sum(v[k] for v in timing.values() for k in v if spent(v, k) and k.endswith("cpu_s"))
    result = {"out_dir": str(out), "problem": problem.name, "simulator": simulator, "methods": order, "seeds": seeds,
              "seed_table": seed_rows, "table": rows, "timing": timing, "summaries": summaries,
              "data": info, "non_steps": non_steps, "non_batch": non_batch, "sol_steps": sol_steps,
              "total_wall_s": total_wall, "total_cpu_s": total_cpu}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2, default=str) + "\n")
    print(table, end="")
    print(f"{problem.name} experiment ({simulator}): {out} (wall {total_wall:.0f}s, cpu {total_cpu:.0f}s)")
    return result


def _plot_seed_bars(per_seed: dict[str, dict[int, float]], seeds: list[int], path: Path, title: str) -> None:
    plt = pyplot()
    names = list(per_seed)
    vals = [torch.tensor([per_seed[n][sd] for sd in seeds], dtype=torch.float64) for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [float(v.mean()) for v in vals], yerr=[float(v.std(unbiased=False)) for v in vals], capsize=6,
           color=[COLORS.get(n, "#9467bd") for n in names], alpha=0.85)
    for i, v in enumerate(vals):
        ax.scatter([i] * len(seeds), v.tolist(), color="k", s=14, zorder=3)
        ax.annotate(f"{float(v.mean()):.4f}", (i, float(v.mean())), ha="left", va="bottom", fontsize=8,
                    xytext=(14, 2), textcoords="offset points")
    ax.set_ylabel("test MAE vs high fidelity (mean over runs and steps)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, problem: SolProblem | None = None) -> int:
    """SRC / NON / ZO-SOL (/ FO-SOL) for a registered simulator over seeds: test MAE table and plots."""
    problem = problem or SolProblem()
    parser = build_parser(problem)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        allowed = allowed_methods(problem)
        unknown = [m for m in methods if m not in allowed]
        if unknown or not methods:
            parser.error(f"--methods: unknown {unknown or '(none)'} for {problem.name}; allowed: {', '.join(allowed)}")
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            seeds = []
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            parser.error(f"--seeds must be distinct integers >= 0, comma-separated, got {args.seeds!r}")
    if args.non_steps is not None and args.non_steps < 0:
        parser.error(f"--non-steps must be >= 0, got {args.non_steps}")
    if args.non_batch is not None and args.non_batch < 1:
        parser.error(f"--non-batch must be >= 1, got {args.non_batch}")
    try:
        run(args, problem)
    except (ConfigError, ProblemSetupError) as exc:
        print(f"blackbox-zo experiment {problem.name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
