"""Control by queries only: CartPole-v1 and Pendulum-v1 policies trained through `GymPolicyOracle`.

`blackbox-zo train cartpole` / `blackbox-zo train pendulum` train a small tanh MLP policy
from episode returns alone (loss = - mean return over the step's episodes, common
random numbers across the perturbations of a step). `blackbox-zo experiment gym`
compares CGE and RGE at the same number of queries per step on both problems and
writes a table (Markdown + CSV) and a plot of test return against queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import Field

from blackbox_zo.config import Strict, TrainConfig
from blackbox_zo.problem import Problem, TrainingSetup
from blackbox_zo.trainer import train
from oracles.gym import GymPolicyOracle, episode_seeds

__all__ = ["GymSection", "GymControlConfig", "EpisodeSeedBatches", "CartPoleProblem", "PendulumProblem", "experiment"]


class GymSection(Strict):
    """The `gym` section: the environment, the policy and the episodes of a step."""

    env_id: str = Field("CartPole-v1", description="registered gymnasium id")
    hidden: list[int] = Field([8], description="hidden widths of the tanh MLP policy")
    episodes_per_step: int = Field(8, ge=1, description="episode seeds per batch, shared by all perturbations")
    steps_per_epoch: int = Field(5, ge=1, description="training steps between evaluations")
    max_episode_steps: Optional[int] = Field(None, ge=1, description="episode length cap (none: the env's own)")
    test_episodes: int = Field(20, ge=1, description="fresh test episodes per evaluation")
    vectorization: Literal["auto", "sync", "async", "vector"] = Field(
        "auto", description="auto: gymnasium's numpy-vectorised env where supported (CartPole), else SyncVectorEnv")
    max_envs: int = Field(512, ge=1, description="sub-environments per vector env")
    obs_norm: bool = Field(False, description="running observation normalisation (updated once per step)")


class GymControlConfig(TrainConfig):
    """cartpole / pendulum: no data set (a batch is a list of episode seeds) and no gradient sparsity
    (a policy of ~50 parameters: dense CGE or RGE)."""

    gym: GymSection = Field(default_factory=GymSection, description="environment, policy, episodes")


class EpisodeSeedBatches:
    """Batch (epoch, i) = `episodes` fresh training seeds, a pure function of (seed, epoch, i)."""

    def __init__(self, episodes: int, steps_per_epoch: int, seed: int = 0):
        self.episodes, self.steps_per_epoch, self.seed = episodes, steps_per_epoch, seed

    def num_batches(self, epoch: int) -> int:
        return self.steps_per_epoch

    def batch(self, epoch: int, index: int) -> list[int]:
        return episode_seeds(self.seed, epoch * self.steps_per_epoch + index, self.episodes)


class _GymControlProblem(Problem):
    config_model = GymControlConfig
    headline_metric = "test_return"
    defaults: dict[str, Any] = {}

    def default_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.defaults))  # a deep copy

    def setup(self, config: GymControlConfig) -> TrainingSetup:
        g = config.gym
        oracle = GymPolicyOracle(
            g.env_id, None, max_episode_steps=g.max_episode_steps, hidden=tuple(g.hidden), obs_norm=g.obs_norm,
            vectorization=g.vectorization, max_envs=g.max_envs, seed=config.run.seed,
        )
        test_seeds = episode_seeds(config.run.seed, 0, g.test_episodes, test=True)
        return TrainingSetup(
            oracle=oracle,
            train_batches=EpisodeSeedBatches(g.episodes_per_step, g.steps_per_epoch, config.run.seed),
            module=oracle.policy,
            evaluate=lambda module: oracle.evaluate(module, test_seeds),
            extras={"test_seeds": test_seeds},
        )


class CartPoleProblem(_GymControlProblem):
    name = "cartpole"
    description = "CartPole-v1, tanh MLP policy (58 parameters) trained from episode returns only; target: mean test return >= 475"
    # 20 epochs x 5 steps x (58 + 1) queries of 8 episodes. Chosen from seeds 0-4: with 3
    # episodes per step 2 of 5 seeds ended below 475 (the policy overfits 3 starts); with 8 all five reach 500.
    defaults = {
        "problem": "cartpole",
        "estimator": {"kind": "cge", "mu": 0.05, "scheme": "forward", "q": 58},
        "optimizer": {"name": "adam", "lr": 0.05},
        "schedule": {"name": "constant"},
        "run": {"epochs": 20, "seed": 0},
        "gym": {"env_id": "CartPole-v1", "hidden": [8], "episodes_per_step": 8, "steps_per_epoch": 5,
                "max_episode_steps": 500, "test_episodes": 20},
    }


class PendulumProblem(_GymControlProblem):
    name = "pendulum"
    description = "Pendulum-v1 swing-up, tanh MLP policy (41 parameters) trained from episode returns only (RGE)"
    # Chosen on seed 0 (200 steps, 8 episodes/step, lr 0.1): CGE mu 0.05 / 0.1 / 0.3 ended at
    # -895 / -992 / -337, RGE mu 0.1 at -274 (2 episodes/step and lr 0.05: CGE stayed at -1250).
    # A Gaussian RGE direction moves theta by ~sqrt(d) mu = 0.64 against CGE's mu, a wider
    # smoothing of a return that is rugged at small scales. On 3 seeds x 400 steps
    # (`blackbox-zo experiment gym`, docs/control.md) the two are about even: each left one seed of
    # three without a swing-up.
    defaults = {
        "problem": "pendulum",
        "estimator": {"kind": "rge", "mu": 0.1, "scheme": "forward", "q": 41},
        "optimizer": {"name": "adam", "lr": 0.1},
        "schedule": {"name": "constant"},
        "run": {"epochs": 40, "seed": 0},
        "gym": {"env_id": "Pendulum-v1", "hidden": [8], "episodes_per_step": 8, "steps_per_epoch": 10,
                "max_episode_steps": 200, "test_episodes": 20},
    }


# ------------------------------------------------------------------------ experiment

_PROBLEMS = {"cartpole": CartPoleProblem, "pendulum": PendulumProblem}


def _run_one(problem: _GymControlProblem, estimator: str, seed: int, run_dir: Path, threads: int,
             extra_sets: Sequence[str]) -> dict[str, Any]:
    """Train one (problem, estimator, seed) with the problem's defaults; RGE gets q = d, the
    same queries per step as forward CGE (d + 1)."""
    sets = [f"estimator.kind={estimator}", f"run.seed={seed}", "run.progress=false", f"run.threads={threads}",
            *extra_sets]
    config = problem.resolve_config(None, sets)
    curve: list[tuple[int, float, float]] = []  # (queries, wall_s, test_return)

    def record(trainer, rec: dict) -> None:
        if "eval/test_return" in rec:
            curve.append((rec["queries"], rec["wall_s"], rec["eval/test_return"]))

    summary = train(problem, config, run_dir=run_dir, callbacks=[record])
    target = 475.0 if problem.name == "cartpole" else None
    first = next((q for q, _, r in curve if target is not None and r >= target), None)
    return {"problem": problem.name, "estimator": estimator, "seed": seed, "mu": config.estimator.mu,
            "test_return": summary["test_return"], "test_return_min": summary["test_return_min"],
            "best_test_return": max(r for _, _, r in curve) if curve else float("nan"),
            "queries": summary["queries"]["total"], "queries_to_475": first, "wall_s": summary["wall_s"],
            "curve": curve, "run_dir": str(run_dir)}


def _write_table(rows: list[dict[str, Any]], out: Path) -> str:
    fields = ["problem", "estimator", "seed", "mu", "test_return", "test_return_min", "best_test_return",
              "queries", "queries_to_475", "wall_s", "run_dir"]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| problem | estimator | mu | seeds | final test return (mean ± sd) | worst seed | seeds >= 475 "
             "| queries to 475 (median) | queries | wall s (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (prob, est) in dict.fromkeys((r["problem"], r["estimator"]) for r in rows):
        group = [r for r in rows if r["problem"] == prob and r["estimator"] == est]
        finals = [r["test_return"] for r in group]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        reached = [r["queries_to_475"] for r in group if r["queries_to_475"] is not None]
        hit = f"{sum(f >= 475 for f in finals)}/{len(group)}" if prob == "cartpole" else "-"
        q475 = f"{statistics.median(reached):.0f}" if reached else "-"
        lines.append(f"| {prob} | {est} | {group[0]['mu']:g} | {','.join(str(r['seed']) for r in group)} | "
                     f"{statistics.mean(finals):.1f} ± "
                     f"{sd:.1f} | {min(finals):.1f} | {hit} | {q475} | {group[0]['queries']} | "
                     f"{statistics.mean(r['wall_s'] for r in group):.0f} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def _plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4), squeeze=False)
    colours = {"cge": "tab:blue", "rge": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in rows})
    for ax, prob in zip(axes[0], problems):
        for r in (r for r in rows if r["problem"] == prob):
            q, _, ret = zip(*r["curve"]) if r["curve"] else ((), (), ())
            ax.plot(q, ret, color=colours.get(r["estimator"]), ls=styles[seeds.index(r["seed"]) % len(styles)],
                    alpha=0.8, marker="o", ms=2, lw=1, label=f"{r['estimator'].upper()} seed {r['seed']}")
        if prob == "cartpole":
            ax.axhline(475, color="grey", ls="--", lw=0.8, label="target 475")
        ax.set_title(f"{prob}: test return (20 fresh episodes)")
        ax.set_xlabel("loss queries")
        ax.set_ylabel("mean test return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "gym_cge_vs_rge.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def experiment(argv: Sequence[str] | None = None) -> int:
    """`blackbox-zo experiment gym`: CGE vs RGE (q = d, equal queries per step) on cartpole and pendulum."""
    parser = argparse.ArgumentParser(prog="blackbox-zo experiment gym", description=(
        "Compare CGE and RGE on the cartpole and pendulum problems at equal queries per step "
        "(RGE q = d) with each problem's default settings. Writes results.csv, results.md and "
        "gym_cge_vs_rge.png (test return against queries) under --out."))
    parser.add_argument("--problems", default="cartpole,pendulum", help="comma-separated: cartpole,pendulum")
    parser.add_argument("--estimators", default="cge,rge", help="comma-separated: cge,rge")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (>= 1)")
    parser.add_argument("--out", default=None, help="output directory (default runs/gym/<timestamp>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every run, e.g. --set run.epochs=5")
    parser.add_argument("--cge-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the CGE runs only, e.g. --cge-set estimator.mu=0.3")
    parser.add_argument("--rge-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the RGE runs only")
    args = parser.parse_args(list(argv or []))
    try:
        problems = [_PROBLEMS[p]() for p in args.problems.split(",")]
        estimators = args.estimators.split(",")
        seeds = [int(s) for s in args.seeds.split(",")]
    except (KeyError, ValueError) as exc:
        parser.error(f"--problems must name {', '.join(_PROBLEMS)}; --seeds must be integers ({exc})")
    if not set(estimators) <= {"cge", "rge"}:
        parser.error(f"--estimators must be cge and/or rge, got {args.estimators!r}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out or Path("runs") / "gym" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for problem in problems:
        for est in estimators:
            for seed in seeds:
                sets = [*args.set, *(args.cge_set if est == "cge" else args.rge_set)]
                row = _run_one(problem, est, seed, out / f"{problem.name}-{est}-seed{seed}", args.threads, sets)
                rows.append(row)
                print(f"{problem.name:<9} {est} seed {seed}: test return {row['test_return']:.1f} "
                      f"(best {row['best_test_return']:.1f}), {row['queries']} queries, {row['wall_s']:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = _write_table(rows, out)
    plot = _plot(rows, out)
    print(table + f"\nwrote {out / 'results.md'}, {out / 'results.csv'}, {plot} ({time.perf_counter() - start:.0f} s)")
    return 0
