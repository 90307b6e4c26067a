"""`blackbox-zo experiment wake-flow`: SRC / NON / FO-SOL / ZO-SOL end to end (DeepZero Fig. 6).

One run: the high-fidelity data (cached), SRC (the low-fidelity solver alone), NON
(first-order on pre-generated one-step pairs, outside the loop), FO-SOL (eq. (A3),
backpropagated through PhiFlow) and ZO-SOL (eq. (A3) by loss values only: CGE + DeepZero
sparsity through our trainer), then the test MAE of each on the held-out Reynolds numbers.
FO-SOL and ZO-SOL share the config, the initial corrector, the batches, the optimizer and
the number of steps: only where the gradient comes from differs.

Writes to `runs/wake-flow-experiment/<timestamp>/`: results.md / results.csv (MAE mean,
std and per test run, wall and CPU seconds, queries), mae_bars.png (Fig. 6-like),
mae_over_time.png, vorticity.png (one test run: reference, SRC, NON, FO-SOL, ZO-SOL),
summary.json, and the trainer's run directories of FO-SOL and ZO-SOL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from blackbox_zo.config import ConfigError, resolve_config
from blackbox_zo.rng import seed_everything
from blackbox_zo.rundir import atomic_write_text, make_run_dir
from blackbox_zo.trainer import Trainer
from oracles.wake_flow import shared_simulator
from problems.experiments.timing import PhaseClock

from .data import WindowBatches, cache_path, load_or_generate
from .methods import evaluate_mae, mae_per_step, one_step_pairs, train_non
from .problem import PAPER_SCALE, WakeFlowProblem, build_corrector, data_spec, loss_weight
from .report import mae_table, plot_mae_bars, plot_mae_over_time, plot_vorticity_strip, write_table

METHODS = ("SRC", "NON", "FO-SOL", "ZO-SOL")

# A smoke run (tests, a first look): tiny grids, a few steps of everything.
QUICK: list[str] = [
    "wake.lo_nx=16", "wake.hifi_factor=2", "wake.skip_steps=40", "wake.record_steps=16", "wake.corrector=tiny",
    "wake.unroll=2", "wake.windows=2", "wake.batches_per_epoch=3", "wake.prune_windows=2", "run.epochs=2",
    "sparsity.q=4",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blackbox-zo experiment wake-flow",
        description="Solver-in-the-loop wake flow: SRC / NON / FO-SOL / ZO-SOL, test MAE table and plots "
                    "(DeepZero Sec. 6.2, Fig. 6). Settings are the wake-flow problem's (see "
                    "`blackbox-zo train wake-flow --help`); --set applies to both SOL runs.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set wake.unroll=8 --set optimizer.lr=3e-4")
    p.add_argument("--config", help="TOML or JSON file with settings")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--non-steps", type=int, default=None,
                   help="NON: Adam steps on one-step pairs (default: the SOL runs' steps)")
    p.add_argument("--non-batch", type=int, default=None,
                   help="NON: pairs per step (default: windows x unroll, the (state, target) pairs of one SOL step)")
    p.add_argument("--out", help="output directory (default: runs/wake-flow-experiment/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="tiny grids and few steps (smoke run)")
    p.add_argument("--paper-scale", action="store_true",
                   help="DeepZero Appx. H settings (500 frames, 56,898-parameter corrector, n = 16, Adam 1e-4, "
                        "10 epochs): a GPU job; --set still applies on top")
    p.add_argument("--no-progress", action="store_true")
    return p


def _train_sol(problem, config, run_dir: Path, label: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trainer on the wake-flow problem (as `blackbox_zo.trainer.train`), keeping the module.
    The test evaluation is left to the experiment (it needs the trajectories)."""
    seed_everything(config.run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=2) + "\n")
    setup = problem.setup(config)
    setup.evaluate = None
    trainer = Trainer(setup, config, run_dir, problem_name=f"wake-flow {label}")
    summary = trainer.fit()
    summary["sparsity"] = setup.extras.get("sparsity")
    return setup.module, summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    problem = WakeFlowProblem()
    paper = [f"{k}={json.dumps(v)}" for k, v in PAPER_SCALE.items()] if args.paper_scale else []
    overrides = (QUICK if args.quick else []) + paper + list(args.set)
    if args.no_progress:
        overrides.append("run.progress=false")
    config = problem.resolve_config(args.config, overrides)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    out = Path(args.out) if args.out else make_run_dir(config.run.out_dir, "wake-flow-experiment")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.model_dump_json(indent=2) + "\n")
    w, progress = config.wake, config.run.progress
    log = print if progress else (lambda *a, **k: None)

    spec = data_spec(w)
    cached = cache_path(spec, w.cache_dir).exists()
    with PhaseClock() as clock:
        data = load_or_generate(spec, w.cache_dir, progress=progress)
    timing: dict[str, dict[str, float]] = {"data": {"wall_s": clock.wall_s, "cpu_s": clock.cpu_s, "cached": cached}}
    log(f"data: {'cached' if cached else 'generated'} {cache_path(spec, w.cache_dir)} "
        f"(wall {clock.wall_s:.1f}s, cpu {clock.cpu_s:.1f}s)")
    sim = shared_simulator(spec.lo_geometry, min_reynolds=spec.min_reynolds, cg_tolerance=w.cg_tolerance)
    weight = loss_weight(sim.mask, data.stats)
    # NON's default budget: as many optimizer steps, and (state, target) pairs per step, as a SOL step.
    sol_steps = config.run.epochs * WindowBatches(data.train, data.train_re, w.unroll, w.windows,
                                                  batches_per_epoch=w.batches_per_epoch).num_batches(0)
    sol_steps = min(sol_steps, config.run.max_steps or sol_steps)
    if args.non_steps is None:
        args.non_steps = sol_steps
    if args.non_batch is None:
        args.non_batch = w.windows * w.unroll

    mae: dict[str, torch.Tensor] = {}
    trajs: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    summaries: dict[str, Any] = {}

    def evaluate(name: str, corrector) -> None:
        with PhaseClock() as c:
            mae[name], trajs[name] = evaluate_mae(sim, corrector, data.test, data.test_re, sim.mask, w.eval_steps)
        timing.setdefault(name, {}).update({"eval_wall_s": c.wall_s, "eval_cpu_s": c.cpu_s})
        log(f"{name}: test MAE {float(mae[name].mean()):.5f} +- {float(mae[name].std(unbiased=False)):.5f}")

    if "SRC" in methods:
        evaluate("SRC", None)
    if "NON" in methods:
        with PhaseClock() as c:
            corrector = build_corrector(w, data, config.run.seed)
            pairs = one_step_pairs(sim, data, max_batch=w.max_batch)
            non_log = train_non(corrector, pairs, weight, steps=args.non_steps, lr=config.optimizer.lr,
                                batch_size=args.non_batch, seed=config.run.seed, progress=progress)
        timing["NON"] = {"train_wall_s": c.wall_s, "train_cpu_s": c.cpu_s}
        summaries["NON"] = {"steps": args.non_steps, "batch": args.non_batch,
                            "final_loss": non_log[-1]["loss"] if non_log else None}
        evaluate("NON", corrector)
    for name, kind in (("FO-SOL", "autograd"), ("ZO-SOL", None)):
        if name not in methods:
            continue
        # FO-SOL: the same settings with the first-order reference (which takes no mu, scheme or sparsity)
        cfg = config.model_copy(deep=True) if kind is None else \
            resolve_config(problem.config_model, config.model_dump(), None, [f"estimator={kind}"], name=problem.name)
        with PhaseClock() as c:
            corrector, summary = _train_sol(problem, cfg, out / name.lower(), name)
        timing[name] = {"train_wall_s": c.wall_s, "train_cpu_s": c.cpu_s}
        summaries[name] = summary
        extra[name] = {"queries": summary["queries"]["total"]}
        evaluate(name, corrector)

    for name, t in timing.items():
        if name in mae:
            extra.setdefault(name, {}).update({"train_wall_s": round(t.get("train_wall_s", 0.0), 1),
                                               "train_cpu_s": round(t.get("train_cpu_s", 0.0), 1)})
    markdown, rows = mae_table(mae, data.test_re, extra)
    write_table(out, markdown, rows)
    hi, lo = spec.hi_geometry, spec.lo_geometry
    title = (f"wake flow {lo.nx}x{lo.ny} vs {hi.nx}x{hi.ny}, {data.test.shape[0]} test Re, "
             f"{trajs[next(iter(trajs))].shape[1] - 1} steps; bars: mean +- std")
    plot_mae_bars(mae, data.test_re, out / "mae_bars.png", title=title)
    plot_mae_over_time({n: mae_per_step(t, data.test, sim.mask) for n, t in trajs.items()}, out / "mae_over_time.png")
    k = data.test.shape[0] // 2
    t_max = trajs[next(iter(trajs))].shape[1] - 1
    times = sorted({0, t_max // 4, t_max // 2, 3 * t_max // 4, t_max})
    plot_vorticity_strip({"reference": data.test[k, : t_max + 1], **{n: t[k] for n, t in trajs.items()}},
                         lo.dx, times, out / "vorticity.png", title=f"test run Re = {float(data.test_re[k]):g}")
    result = {"out_dir": str(out), "methods": methods, "table": rows, "timing": timing, "summaries": summaries,
              "data_cache": str(cache_path(spec, w.cache_dir)), "non_steps": args.non_steps,
              "non_batch": args.non_batch,
              "total_wall_s": sum(v.get(k2, 0.0) for v in timing.values() for k2 in v if k2.endswith("wall_s")),
              "total_cpu_s": sum(v.get(k2, 0.0) for v in timing.values() for k2 in v if k2.endswith("cpu_s"))}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2, default=str) + "\n")
    print(markdown, end="")
    print(f"wake-flow experiment: {out} (wall {result['total_wall_s']:.0f}s, cpu {result['total_cpu_s']:.0f}s)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """SRC / NON / FO-SOL / ZO-SOL on the wake flow: test MAE table and plots (DeepZero Fig. 6)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or '(none)'}; allowed: {', '.join(METHODS)}")
    if args.non_steps is not None and args.non_steps < 0:
        parser.error(f"--non-steps must be >= 0, got {args.non_steps}")
    if args.non_batch is not None and args.non_batch < 1:
        parser.error(f"--non-batch must be >= 1, got {args.non_batch}")
    try:
        run(args)
    except ConfigError as exc:
        print(f"blackbox-zo experiment wake-flow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
