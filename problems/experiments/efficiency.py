"""Queries to a target, per method (`blackbox-zo experiment efficiency`; docs/efficiency.md).

For each task (a problem at one size) and each method (a set of settings over the problem's
defaults), over several seeds, at one query budget per task:

* the run is the ordinary trainer run (`blackbox_zo.trainer.train`: the same Oracle,
  ledger, budget and estimator registry), its steps fitted to the budget
  (`run.max_steps` = what the budget pays for after the method's setup queries, so a
  schedule such as cosine ends at the budget);
* the headline metric is evaluated every `budget / eval_points` queries (a callback; its
  time is not counted as training time and it draws no random numbers);
* recorded: the queries (all of them, setup such as ZO-GraSP included) at which the
  metric first reaches the task's target, the metric at the budget, the images or
  simulation steps consumed, the training wall time.

Every finished run is cached as one JSON file under OUT/runs/ (written atomically), so an
interrupted study resumes where it stopped; `--estimate` times two steps of every method
and prints the predicted cost before anything long runs. Outputs: OUT/efficiency.{md,csv}
(one row per task and method: mean over seeds), OUT/<task>.png (metric vs queries),
OUT/summary.json (the settings exactly as run, the winner of each task, and the digits
width at which Sparse-CGE overtakes the evolution strategies, if it does).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from blackbox_zo.config import ConfigError, deep_merge, parse_overrides, resolve_config
from blackbox_zo.evolution import is_search
from blackbox_zo.oracle import QueryLedger, job_ledger
from blackbox_zo.problem import get_problem
from blackbox_zo.rundir import atomic_write_text
from blackbox_zo.trainer import Trainer, train
from problems.digits import DEEPZERO_RECIPE, ES_LAST_THEN_SPARSE_CGE, SEP_CMA_THEN_SPARSE_CGE, SUBSPACE_THEN_SPARSE_CGE
from problems.wake_flow.problem import ZO_SOL as WAKE_ZO_SOL

from .tables import experiment_dir, write_table

__all__ = ["Task", "METHODS", "TASKS", "queries_to_target", "run_one", "study_table", "main"]


@dataclass(frozen=True)
class Task:
    """One problem at one size: the settings every method shares, the metric, its target and the budget."""

    name: str
    problem: str
    settings: dict[str, Any]
    metric: str
    target: float
    higher_is_better: bool
    budget: int
    units: str  # what a query consumes: "images" or "simulation steps"
    units_per_query: Callable[[Any], int] = field(compare=False, default=lambda config: 1)
    dim_hint: int = 0  # the number of parameters (for the crossover statement)
    # True: a method's steps are fitted to the budget (its schedule ends there); False: each method runs its
    # own whole run (run.epochs) and the budget is only a cap (digits-w8-run: the default run vs the recipe)
    fit_to_budget: bool = True
    also: tuple[str, ...] = ()  # further metrics reported at the budget (the table's extra columns)
    # When set, seed s's target is what this method reaches at the budget on seed s (the metric's
    # level differs from seed to seed, e.g. each seed has its own black box), and `target` is unused.
    target_from: str | None = None
    target_slack: float = 0.0  # with target_from: the target is that value made worse by this fraction
    held: bool = False  # queries to target: from where the metric stays at the target (see queries_to_target)

    def describe_target(self) -> str:
        if self.target_from:
            slack = f" within {self.target_slack:.0%}" if self.target_slack else ""
            return f"{self.metric}{slack} of {self.target_from}'s at the budget, same seed{', held' if self.held else ''}"
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.target}"


def images_per_query(config) -> float:
    """Images a query of the run consumes (NaN when its phases use batches of two sizes)."""
    sizes = {int(config.data.batch_size)}
    if config.phase2 is not None:
        p1 = config.phase1.batch_size if config.phase1 is not None else None
        sizes = {p1 or int(config.data.batch_size), config.phase2.batch_size or int(config.data.batch_size)}
    return float(sizes.pop()) if len(sizes) == 1 else math.nan


def _sim_steps(config) -> int:
    return int(config.wake.unroll * config.wake.windows)


# A digits query is one batch of at most 64 images (issue 16): the ES-family and RGE use 64-image
# batches; the DeepZero recipe (the digits default) keeps its own 16-image batches.
_DENSE64 = {"sparsity": {"enabled": False}, "data": {"batch_size": 64}, "phase2": None}
_B64 = {"data": {"batch_size": 64}, "phase2": None}

# Methods as settings over each problem's defaults. `None` in a task's row: not run for it. The ES-family methods
# say `blocks: None` (every coordinate, or the ZO-GraSP set): the digits default names a block (its phase 1 on the
# last layer), and a merged default must not narrow them.
METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        "sparse-cge": DEEPZERO_RECIPE,  # ZO-GraSP (90%) + Sparse-CGE, SGD 0.1 momentum, batch 16, cosine
        "cge": {**_DENSE64, "estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"}},
        "rge": {**_DENSE64, "estimator": {"kind": "rge", "q": 28, "scheme": "central", "mu": 5e-3},
                "optimizer": {"name": "adam", "lr": 0.01}},
        "es": {**_DENSE64, "estimator": {"kind": "es", "q": 14, "mu": 0.02, "blocks": None},
               "optimizer": {"name": "adam", "lr": 0.01}},
        # the hybrid: ES in the step's ZO-GraSP coordinate set (half the weights, redrawn every epoch)
        "es-grasp": {**_B64, "estimator": {"kind": "es", "q": 14, "mu": 0.02, "blocks": None},
                     "optimizer": {"name": "adam", "lr": 0.01}, "sparsity": {"sparsity": 0.5,
                                                                            "resample_every_epochs": 1}},
        "guided-es": {**_DENSE64, "estimator": {"kind": "guided-es", "q": 14, "mu": 0.02, "guide_k": 4,
                                                "guide_alpha": 0.5, "blocks": None},
                      "optimizer": {"name": "adam", "lr": 0.01}},
        "sep-cma-es": {**_DENSE64, "estimator": {"kind": "sep-cma-es", "mu": 0.02, "popsize": 28}},
        # variants measured while choosing the digits default (docs/efficiency.md): cheaper queries (smaller
        # batches), a smaller ES subspace, very sparse CGE with Adam
        "es-grasp-90": {**_B64, "estimator": {"kind": "es", "q": 14, "mu": 0.02, "blocks": None}, "optimizer": {"name": "adam",
                        "lr": 0.01}, "sparsity": {"sparsity": 0.9, "resample_every_epochs": 1}},
        "es-grasp-b32": {"data": {"batch_size": 32}, "phase2": None, "estimator": {"kind": "es", "q": 14, "mu": 0.02, "blocks": None},
                         "optimizer": {"name": "adam", "lr": 0.01}, "sparsity": {"sparsity": 0.5,
                                                                                "resample_every_epochs": 1}},
        "sep-cma-es-b32": {**_DENSE64, "data": {"batch_size": 32}, "estimator": {"kind": "sep-cma-es", "mu": 0.02,
                                                                                "popsize": 28}},
        "sparse-cge-99-adam": {**_B64, "estimator": {"kind": "cge", "mu": 5e-3}, "optimizer": {"name": "adam",
                               "lr": 0.01}, "sparsity": {"sparsity": 0.99, "resample_every_epochs": 1}},
        # the last layer only (model.frozen_convs=2: the convolutions keep their seeded initialisation, random
        # features): a population runs the conv stack once per batch (docs/efficiency.md, width 32)
        "sep-cma-es-fc": {**_DENSE64, "model": {"frozen_convs": 2}, "estimator": {"kind": "sep-cma-es", "mu": 0.1,
                                                                                "popsize": 28}},
        "es-fc": {**_DENSE64, "model": {"frozen_convs": 2}, "estimator": {"kind": "es", "q": 14, "mu": 0.02, "blocks": None},
                  "optimizer": {"name": "adam", "lr": 0.03}},
        # the hybrid on the last layer: ES in the linear layer's ZO-GraSP set (half its weights, redrawn every epoch)
        "es-grasp-fc": {**_B64, "model": {"frozen_convs": 2}, "estimator": {"kind": "es", "q": 14, "mu": 0.02, "blocks": None},
                        "optimizer": {"name": "adam", "lr": 0.05}, "sparsity": {"sparsity": 0.5,
                                                                               "resample_every_epochs": 1}},
        # the two-phase run (a whole run: task digits-w8-run)
        "sep-cma-es+sparse-cge": SEP_CMA_THEN_SPARSE_CGE,
        # ES on the last layer only (the conv layers run once per batch: cheap queries), 64 images
        "es-last": {**_B64, "estimator": ES_LAST_THEN_SPARSE_CGE["estimator"],
                    "optimizer": ES_LAST_THEN_SPARSE_CGE["phase1"]["optimizer"]},
        # ... then Sparse-CGE on every layer (a whole run: task digits-w8-run)
        "es-last+sparse-cge": ES_LAST_THEN_SPARSE_CGE,
        # subspace CGE on the last layer: CGE along e_k v_j^T, v_j the batch inputs' top-16 singular vectors
        # (161 queries a step), Adam 0.5 (the default's phase 1), 64 images
        "subspace-last": {**_B64, "estimator": SUBSPACE_THEN_SPARSE_CGE["estimator"],
                          "optimizer": SUBSPACE_THEN_SPARSE_CGE["phase1"]["optimizer"]},
        # ... then Sparse-CGE on every layer (a whole run: task digits-w8-run)
        "subspace+sparse-cge": SUBSPACE_THEN_SPARSE_CGE,
        # ... with phase 2 on 16-image batches and Adam 3e-3 (phase 1 = 24 whole epochs of 64 images)
        "es-last+sparse-cge-b16": deep_merge(ES_LAST_THEN_SPARSE_CGE, {
            "run": {"epochs": 31}, "phase2": {"after_steps": 528, "batch_size": 16, "optimizer": {"lr": 3e-3}}}),
    },
    # Each over DeepZero's ZO-SOL (problems.wake_flow.ZO_SOL: 95% random sparsity, forward CGE mu 1e-3, Adam 1e-3
    # cosine, 80 epochs), the wake flow's default when this study ran (its default is now `non+es`), so that every
    # method means what it did; each names where it starts.
    "wake-flow": {name: deep_merge(WAKE_ZO_SOL, spec) for name, spec in {
        "sparse-cge": {"wake": {"warm_start": "none"}},  # ZO-SOL (DeepZero): 95% random sparsity, forward CGE, Adam 1e-3
        # NON's corrector (first-order on pre-generated one-step pairs, no queries), then ZO-SOL from there
        "non+sparse-cge": {"wake": {"warm_start": "non"}},
        # dense forward CGE: d + 1 = 507 queries a step (tiny), 50 steps
        "cge": {"sparsity": {"enabled": False}, "wake": {"warm_start": "none"}},
        "rge": {"sparsity": {"enabled": False}, "estimator": {"kind": "rge", "q": 16, "scheme": "central",
                                                              "mu": 1e-3}, "wake": {"warm_start": "none"}},
        "es": {"sparsity": {"enabled": False}, "estimator": {"kind": "es", "q": 8, "mu": 1e-3},
               "optimizer": {"name": "adam", "lr": 1e-3}, "wake": {"warm_start": "none"}},
        # NON's corrector, then the `es` row's run: the wake flow's default since it won wake-tiny on every seed
        "non+es": {"sparsity": {"enabled": False}, "estimator": {"kind": "es", "q": 8, "mu": 1e-3},
                   "optimizer": {"name": "adam", "lr": 1e-3}, "wake": {"warm_start": "non"}},
        "sep-cma-es": {"sparsity": {"enabled": False}, "estimator": {"kind": "sep-cma-es", "mu": 2e-3,
                                                                     "popsize": 16}, "wake": {"warm_start": "none"}},
        # full covariance: d = 506 (tiny) is small enough for a 506 x 506 eigendecomposition a step
        "cma-es": {"sparsity": {"enabled": False}, "estimator": {"kind": "cma-es", "mu": 2e-3, "popsize": 16},
                   "wake": {"warm_start": "none"}},
    }.items()},
    # Each method keeps the problem's optimizer (Adam 3e-4) and its step schedule, stretched to the run
    # (`fitted_step_schedule`); sigma 5e-3 is CGE's own step mu. Sparsity is set explicitly either way,
    # so a method means the same whichever the problem's default is.
    "certified-defense": {
        # forward CGE over all 289 parameters of the denoiser's last layer (the default until this study)
        "cge": {"estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"}, "sparsity": {"enabled": False}},
        # DeepZero's Sparse-CGE: ZO-GraSP through the black box (386 queries), half the weights a step
        "sparse-cge": {"estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"},
                       "sparsity": {"enabled": True, "sparsity": 0.5}},
        "rge": {"estimator": {"kind": "rge", "q": 16, "scheme": "central"}, "sparsity": {"enabled": False}},
        "es": {"estimator": {"kind": "es", "q": 8, "mu": 5e-3}, "sparsity": {"enabled": False}},
        "es-grasp": {"estimator": {"kind": "es", "q": 8, "mu": 5e-3},  # the hybrid: ES in the ZO-GraSP set
                     "sparsity": {"enabled": True, "sparsity": 0.5}},
        "guided-es": {"estimator": {"kind": "guided-es", "q": 8, "mu": 5e-3, "guide_k": 4, "guide_alpha": 0.5},
                      "sparsity": {"enabled": False}},
        "sep-cma-es": {"estimator": {"kind": "sep-cma-es", "mu": 5e-3, "popsize": 16}, "sparsity": {"enabled": False}},
        "cma-es": {"estimator": {"kind": "cma-es", "mu": 5e-3, "popsize": 16},  # d = 289: the full covariance
                   "sparsity": {"enabled": False}},
    },
}

_DIGITS = dict(problem="digits", metric="test_acc", target=0.94, higher_is_better=True, units="images",
               units_per_query=images_per_query)
_WAKE = dict(problem="wake-flow", metric="test_mae", target=0.0327, higher_is_better=False, budget=25_600,
             units="simulation steps", units_per_query=_sim_steps)
TASKS: dict[str, Task] = {
    "digits-w8": Task("digits-w8", settings={"model": {"width": 8}}, budget=30_000, dim_hint=3_818, **_DIGITS),
    "digits-w32": Task("digits-w32", settings={"model": {"width": 32}}, budget=30_000, dim_hint=29_066, **_DIGITS),
    # whole runs, not fitted to a budget: the recipe's 10 epochs vs the two-phase run's 15 (cap 400K queries)
    "digits-w8-run": Task("digits-w8-run", settings={"model": {"width": 8}}, budget=400_000, dim_hint=3_818,
                          fit_to_budget=False, **_DIGITS),
    "digits-w64": Task("digits-w64", settings={"model": {"width": 64}}, budget=30_000, dim_hint=94_986, **_DIGITS),
    "wake-tiny": Task("wake-tiny", settings={"wake": {"corrector": "tiny"}}, dim_hint=506, **_WAKE),
    "wake-small": Task("wake-small", settings={"wake": {"corrector": "small"}}, dim_hint=1_010, **_WAKE),
    # The fine-tune moves the noisy accuracy by a few of its 1,440 predictions (0.926 -> 0.93), so the
    # curve follows eq. (A2)'s held-out cross-entropy on the same noisy test images (a smooth metric);
    # the accuracies are reported at the budget. Budget: the default run's own (440 CGE steps of 290).
    # The target is the default's own result: what CGE reaches at that budget on the same seed (each
    # seed has its own black box and denoiser, and the loss's level differs by seed: 0.31, 0.21, ...),
    # within 1% and held to the end of the run: the loss is deterministic, and an early dip that a
    # method leaves again (the population methods overshoot at the start) is not where the run ends;
    # without the 1%, the default itself would "reach" its last digit only at its last evaluation.
    "certified-defense": Task("certified-defense", problem="certified-defense", settings={"run": {"threads": 1}},
                              metric="test_noisy_loss", target=math.nan, higher_is_better=False, budget=127_600,
                              units="images", units_per_query=images_per_query, dim_hint=289,
                              also=("test_noisy_acc", "test_clean_acc"), target_from="cge", target_slack=0.01,
                              held=True),
}


def _family(task: Task) -> str:
    return task.problem


def method_settings(task: Task, method: str, seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The problem's defaults <- the task's settings <- the method's <- `overrides` (`--set`, every run)."""
    problem = get_problem(task.problem)
    spec = METHODS[_family(task)].get(method)
    if spec is None:
        raise KeyError(f"method {method!r} is not defined for {task.problem} (have: {', '.join(METHODS[task.problem])})")
    settings = deep_merge(deep_merge(deep_merge(problem.default_config(), task.settings), spec), overrides or {})
    return deep_merge(settings, {"run": {"seed": seed, "progress": False}})


@dataclass
class Probe:
    setup_queries: int  # spent before the first step (e.g. ZO-GraSP)
    step_queries: int
    steps_per_epoch: int
    dim: int
    step_s: float  # measured seconds per step (min of two), 0 when not timed


def probe(task: Task, method: str, seed: int, time_steps: bool = False, overrides: dict[str, Any] | None = None
          ) -> Probe:
    """What a step of `method` costs on `task`: its plan's queries (nothing evaluated) and, with
    `time_steps`, the wall time of two steps (min)."""
    problem = get_problem(task.problem)
    config = resolve_config(problem.config_model, method_settings(task, method, seed, overrides))
    torch.manual_seed(seed)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    ledger = QueryLedger()
    with job_ledger(ledger):
        setup = problem.setup(config)
    trainer = Trainer(setup, config, None, problem_name=problem.name)
    batch = trainer.batches.batch(0, 0)
    theta, coords, _ = trainer.step_inputs(batch)  # the first step's coordinates, as the trainer picks them
    chunk = max(1, trainer.oracle.chunk_size(theta))
    est = trainer.estimator
    plan = est.plan(theta, seed=0, chunk=chunk) if is_search(est) else est.step_plan(
        trainer.oracle, theta, batch, coords=coords, seed=0, chunk=chunk)
    step_s = 0.0
    if time_steps:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            if is_search(est):
                est.step(trainer.oracle, theta, batch, seed=0)
            else:
                est.estimate(trainer.oracle, theta, batch, coords=coords, seed=0)
            times.append(time.perf_counter() - start)
        step_s = min(times)
    return Probe(ledger.total, plan.num_queries, trainer.batches.num_batches(0), trainer.space.dim, step_s)


def fitted_step_schedule(settings: dict[str, Any], run_epochs: float) -> dict[str, Any]:
    """A step schedule (lr x gamma every k epochs) stretched to a run of `run_epochs` epochs.

    A problem's step schedule is written for its own run length (certified-defense: /10 every 4 of
    20 epochs). A method whose steps are cheaper takes more epochs for the same budget; left in
    epochs, its lr would be divided by 10 many more times than the default's. Scaling k by
    run_epochs / the problem's epochs keeps the shape: the same number of decays at the same
    fractions of the budget. Other schedules are left alone (cosine already follows the run).
    """
    schedule = settings.get("schedule") or {}
    if schedule.get("name") != "step":
        return {}
    every, epochs = int(schedule.get("step_every_epochs", 10)), int(settings.get("run", {}).get("epochs", 10))
    return {"schedule": {"step_every_epochs": max(1, round(every * run_epochs / epochs))}}


def pinned_warm_start(problem, settings: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """The warm start's steps written out, so that fitting a run to the budget leaves them alone.

    A `sol` problem's NON warm start (`warm_start=non`; it spends no queries) takes, unless told,
    as many Adam steps as the run: run.epochs x batches per epoch, as the NON method does. Fitting
    the run to the budget rewrites run.epochs (wake-small: 419 steps in 43 epochs instead of the
    problem's 800 in 80), which would change the warm start with it; pinned to the run's own length
    (`settings`, before fitting), the warm start is the NON method's whatever the budget.
    """
    section = getattr(problem, "section", None)
    if section is None:
        return {}
    config = resolve_config(problem.config_model, settings)
    loop = getattr(config, section, None)
    if getattr(loop, "warm_start", "none") != "non" or loop.warm_start_steps is not None:
        return {}
    return {section: {"warm_start_steps": config.run.epochs * steps_per_epoch}}


def queries_to_target(curve: Sequence[tuple[int, float]], target: float, higher_is_better: bool,
                      held: bool = False) -> int | None:
    """The queries of the first evaluation that meets the target (None: never); with `held`, the first
    from which every later evaluation meets it too (a run that passes the target and leaves it again
    is not at the target when it stops)."""
    meets = [(value >= target) if higher_is_better else (value <= target) for _, value in curve]
    if held:
        misses = [i for i, ok in enumerate(meets) if not ok]
        first = misses[-1] + 1 if misses else 0
        return int(curve[first][0]) if first < len(curve) else None
    return next((int(q) for (q, _), ok in zip(curve, meets) if ok), None)


class _Curve:
    """A trainer callback: the task's metric every `every` queries (not counted as training time), and the
    process CPU seconds of the steps, evaluations excluded (`train_cpu_s`, measured from the first step record to
    the last one's and scaled for the first step;
    one-thread runs on a shared machine are timed more fairly by CPU than by wall seconds)."""

    def __init__(self, metric: str, every: int):
        self.metric, self.every, self.next_at = metric, max(1, every), max(1, every)
        self.points: list[tuple[int, float]] = []
        self.eval_s = 0.0
        self.eval_cpu_s = 0.0
        self._cpu_first: float | None = None
        self._cpu_last = 0.0
        self._eval_cpu_at_first = self._eval_cpu_at_last = 0.0
        self._steps = 0

    @property
    def train_cpu_s(self) -> float:
        """The CPU seconds of the steps after the first, scaled by steps / (steps - 1) for the first one's
        (which ends before the first record); NaN for a run of one step."""
        if self._cpu_first is None or self._steps < 2:
            return float("nan")
        window = self._cpu_last - self._cpu_first - (self._eval_cpu_at_last - self._eval_cpu_at_first)
        return window * self._steps / (self._steps - 1)

    def __call__(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "loss" in record:
            self._steps += 1
            now = time.process_time()
            if self._cpu_first is None:
                self._cpu_first, self._eval_cpu_at_first = now, self.eval_cpu_s
            self._cpu_last, self._eval_cpu_at_last = now, self.eval_cpu_s
        self._evaluate(trainer, record)

    def _evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "loss" not in record or record["queries"] < self.next_at or trainer.setup.evaluate is None:
            return
        start, start_cpu = time.perf_counter(), time.process_time()
        module = trainer.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), trainer.oracle.ledger.phase("eval"):
                value = float(trainer.setup.evaluate(module)[self.metric])
        finally:
            module.train(was_training)
        self.points.append((int(record["queries"]), value))
        while self.next_at <= record["queries"]:
            self.next_at += self.every
        self.eval_s += time.perf_counter() - start
        self.eval_cpu_s += time.process_time() - start_cpu


def run_one(task: Task, method: str, seed: int, eval_points: int, cache: Path,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run (cached in `cache` as JSON: a finished run is never run again; the cache key is the task,
    method and seed only, so a study with other `overrides` needs its own folder)."""
    path = cache / f"{task.name}__{method}__s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    problem = get_problem(task.problem)
    info = probe(task, method, seed, overrides=overrides)
    train_budget = task.budget - info.setup_queries
    if train_budget < info.step_queries:
        result = {"task": task.name, "method": method, "seed": seed, "skipped": (
            f"one step needs {info.step_queries} queries after {info.setup_queries} setup queries: over the "
            f"budget of {task.budget}")}
        atomic_write_text(path, json.dumps(result) + "\n")
        return result
    base = method_settings(task, method, seed, overrides)
    if task.fit_to_budget:
        steps = train_budget // info.step_queries
        fitted = {"max_steps": steps, "epochs": math.ceil(steps / info.steps_per_epoch) + 1}
        stretched = fitted_step_schedule(base, steps / info.steps_per_epoch)
    else:
        fitted, stretched = {}, {}  # the method's own run; the budget only caps it
    settings = deep_merge(base, {"run": {
        **fitted, "query_budget": task.budget,
        "eval_every_epochs": 10**6}})  # the curve callback evaluates; the trainer once at the end
    settings = deep_merge(settings, stretched)
    if task.fit_to_budget:
        settings = deep_merge(settings, pinned_warm_start(problem, base, info.steps_per_epoch))
    config = resolve_config(problem.config_model, settings)
    curve = _Curve(task.metric, task.budget // eval_points)
    summary = train(problem, config, None, callbacks=[curve])
    final = float(summary.get(task.metric, float("nan")))
    total = int(summary["queries"]["total"])
    points = curve.points + [(total, final)] if not curve.points or curve.points[-1][0] != total else curve.points
    result = {
        "task": task.name, "method": method, "seed": seed, "dim": info.dim, "budget": task.budget,
        "setup_queries": info.setup_queries, "step_queries": info.step_queries, "steps": summary["steps"],
        "queries": total, "metric": task.metric, "final": final, "curve": points,
        "also": {m: float(summary.get(m, float("nan"))) for m in task.also},
        "queries_to_target": None if task.target_from else queries_to_target(points, task.target,
                                                                               task.higher_is_better, task.held),
        "units": task.units, "units_consumed": summary["queries"]["train"] * task.units_per_query(config),
        "train_wall_s": round(float(summary["wall_s"]) - curve.eval_s, 3), "eval_s": round(curve.eval_s, 3),
        "train_cpu_s": round(curve.train_cpu_s, 3),
        "settings": config.model_dump(mode="json"),  # exactly as run (defaults that do not apply dropped)
        "overrides": overrides or {},
    }
    atomic_write_text(path, json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------- tables


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def seed_targets(task: Task, results: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Each seed's target: `task.target`, or with `target_from` that method's metric at the budget."""
    if task.target_from is None:
        return {r["seed"]: task.target for r in results}
    worse = 1 - task.target_slack if task.higher_is_better else 1 + task.target_slack
    return {r["seed"]: r["final"] * worse for r in results if r["method"] == task.target_from and "skipped" not in r}


def _reached(task: Task, run: dict[str, Any], targets: dict[int, float]) -> int | None:
    if run["seed"] not in targets:  # no run of the target's method on this seed (yet)
        return None
    if run.get("curve"):
        return queries_to_target(run["curve"], targets[run["seed"]], task.higher_is_better, task.held)
    return run["queries_to_target"]


def study_table(task: Task, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: queries to target (mean when every seed reached it), metric at the budget, cost."""
    rows = []
    targets = seed_targets(task, results)
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method and "skipped" not in r]
        if not runs:
            continue
        # from the curve, so that a report with another target needs no new runs
        reached = [q for q in (_reached(task, r, targets) for r in runs) if q is not None]
        finals = [r["final"] for r in runs]
        rows.append({
            "task": task.name, "d": runs[0]["dim"], "method": method, "seeds": len(runs),
            "reached": f"{len(reached)}/{len(runs)}",
            "queries_to_target": _mean(reached) if len(reached) == len(runs) else float("nan"),
            "worst_queries_to_target": max(reached) if len(reached) == len(runs) else float("nan"),
            f"{task.metric}_at_budget": _mean(finals),
            "std_at_budget": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            **{f"{m}_at_budget": _mean([r.get("also", {}).get(m, float("nan")) for r in runs]) for m in task.also},
            "queries": _mean([r["queries"] for r in runs]),
            task.units.replace(" ", "_"): _mean([r["units_consumed"] for r in runs]),
            "train_wall_s": _mean([r["train_wall_s"] for r in runs]),
            "train_cpu_s": _mean([r.get("train_cpu_s", float("nan")) for r in runs]),
        })
    return rows


def winner(task: Task, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Fewest queries to the target (all seeds; wall time breaks ties); when no method reaches it, the best
    metric at the budget."""
    if not rows:
        return None
    hit = [r for r in rows if not math.isnan(r["queries_to_target"])]
    if hit:
        best = min(hit, key=lambda r: (r["queries_to_target"], r["train_wall_s"]))
        return {"method": best["method"], "by": "queries to target", "value": best["queries_to_target"]}
    key = f"{task.metric}_at_budget"
    best = (max if task.higher_is_better else min)(rows, key=lambda r: r[key])
    return {"method": best["method"], "by": f"{task.metric} at the budget", "value": best[key]}


def crossover(tables: dict[str, list[dict[str, Any]]]) -> str:
    """The digits width at which Sparse-CGE needs fewer queries to the target than the best ES-family method."""
    es_family = ("es", "guided-es", "sep-cma-es", "cma-es")
    lines = []
    widths = [n for n in tables if n.startswith("digits-w") and n[len("digits-w"):].isdigit()]
    for name in sorted(widths, key=lambda n: int(n[len("digits-w"):])):
        rows = {r["method"]: r for r in tables[name]}
        sparse = rows.get("sparse-cge")
        es = [r for m, r in rows.items() if m in es_family]
        if sparse is None or not es:
            continue
        best_es = min(es, key=lambda r: (_or_inf(r["queries_to_target"]), -r["test_acc_at_budget"]))
        s_q, e_q = sparse["queries_to_target"], best_es["queries_to_target"]
        ahead = (not math.isnan(s_q)) and (math.isnan(e_q) or s_q < e_q) or (
            math.isnan(s_q) and math.isnan(e_q) and sparse["test_acc_at_budget"] > best_es["test_acc_at_budget"])
        lines.append(f"{name} (d = {sparse['d']}): Sparse-CGE {'ahead of' if ahead else 'behind'} {best_es['method']} "
                     f"(queries to target {_q(s_q)} vs {_q(e_q)}; accuracy at the budget "
                     f"{sparse['test_acc_at_budget']:.3f} vs {best_es['test_acc_at_budget']:.3f})")
        if ahead:
            lines.append(f"Sparse-CGE overtakes the evolution strategies at d = {sparse['d']} ({name}).")
            return "\n".join(lines)
    if lines:
        lines.append("Sparse-CGE does not overtake the evolution strategies at any width studied.")
    return "\n".join(lines)


def _or_inf(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _q(value: float) -> str:
    return "not reached" if math.isnan(value) else f"{value:,.0f}"


def plot_task(path: Path, task: Task, results: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # a target per seed: each curve is drawn relative to its seed's reference (the levels differ by seed)
    refs = {} if task.target_from is None else {s: t / (1 - task.target_slack if task.higher_is_better else
                                                           1 + task.target_slack)
                                                for s, t in seed_targets(task, results).items()}
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method and "skipped" not in r
                and (not refs or r["seed"] in refs)]
        for i, r in enumerate(runs):
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ys = [y / refs[r["seed"]] for y in ys] if refs else ys
            ax.plot(xs, ys, color=f"C{list(METHODS[_family(task)]).index(method)}", alpha=0.8, lw=1.2,
                    label=method if i == 0 else None)
    if task.target_from is None:
        ax.axhline(task.target, color="k", ls=":", lw=0.8, label=f"target {task.target}")
    else:
        worse = 1 - task.target_slack if task.higher_is_better else 1 + task.target_slack
        ax.axhline(worse, color="k", ls=":", lw=0.8, label=f"target ({task.target_from}'s final, {task.target_slack:.0%})")
    ax.axvline(task.budget, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("loss queries (setup included)")
    ax.set_ylabel(task.metric if not refs else f"{task.metric} / {task.target_from}'s at the budget (same seed)")
    ax.set_title(f"{task.name}: {task.metric} vs queries, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS_FIXED = ("task", "d", "method", "seeds", "reached", "queries_to_target", "worst_queries_to_target")


def write_outputs(out: Path, tasks: Sequence[Task], results: Sequence[dict[str, Any]], args_used: dict[str, Any]
                  ) -> dict[str, Any]:
    tables, winners, md = {}, {}, []
    for task in tasks:
        mine = [r for r in results if r["task"] == task.name]
        rows = study_table(task, mine)
        if not rows:
            continue
        tables[task.name] = rows
        winners[task.name] = winner(task, rows)
        columns = [*COLUMNS_FIXED, f"{task.metric}_at_budget", "std_at_budget",
                   *(f"{m}_at_budget" for m in task.also), "queries",
                   task.units.replace(" ", "_"), "train_wall_s", "train_cpu_s"]
        text = write_table(rows, out / task.name, columns)
        w = winners[task.name]
        md += [f"### {task.name} (d = {rows[0]['d']}, budget {task.budget:,} queries, target: "
               f"{task.describe_target()})", "", text,
               f"Winner: **{w['method']}** ({w['by']}: {fmt_value(w['value'])}).", "",
               f"Per seed ({task.metric} at the budget / queries to the target):", "",
               *per_seed_lines(task, mine), ""]
        try:
            plot_task(out / f"{task.name}.png", task, mine)
        except Exception as exc:  # noqa: BLE001 - a plot must never lose the numbers
            print(f"could not write {task.name}.png: {exc}", file=sys.stderr)
    cross = crossover(tables)
    if cross:
        md += ["### Sparse-CGE vs the evolution strategies, by width", "", *cross.splitlines(), ""]
    all_rows = [row for rows in tables.values() for row in rows]
    atomic_write_text(out / "efficiency.md", "\n".join(md) + "\n")
    write_table(all_rows, out / "efficiency_rows", None) if all_rows else None
    summary = {"settings": args_used, "winners": winners, "crossover": cross,
               "tasks": {t.name: {**{k: v for k, v in asdict(t).items() if k != "units_per_query"}} for t in tasks},
               "methods": {t.name: {m: method_settings(t, m, 0, args_used.get("overrides")) for m in args_used["methods"]
                                    if m in METHODS[_family(t)]} for t in tasks}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def per_seed_lines(task: Task, results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per method: each seed's metric at the budget and queries to its target."""
    targets, lines = seed_targets(task, results), []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = sorted((r for r in results if r["method"] == method and "skipped" not in r), key=lambda r: r["seed"])
        cells = []
        for r in runs:
            q = _reached(task, r, targets)
            cells.append(f"seed {r['seed']}: {fmt_value(r['final'])} / {'-' if q is None else f'{q:,}'}")
        lines.append(f"* {method}: " + "; ".join(cells))
    return lines


def fmt_value(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}"


# ----------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blackbox-zo experiment efficiency", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits-w8", help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--methods", default="sparse-cge,cge,rge,es,guided-es,sep-cma-es",
                   help="comma-separated; a method a task's problem does not define is left out for it")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=None, help="queries per run (default: each task's own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting over every method's, e.g. --set run.threads=1 --set estimator.mu=0.005 (a "
                        "finished run is cached by task, method and seed only: use a new --out for other settings)")
    p.add_argument("--eval-points", type=int, default=40, help="evaluations along each run (budget / this apart)")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/efficiency/<timestamp>); "
                   "give the same folder again to resume")
    p.add_argument("--report", action="store_true", help="write the tables and plots from the runs already in "
                   "OUT/runs (needs --out); run nothing")
    p.add_argument("--estimate", action="store_true", help="time two steps of each method and print the cost; "
                   "run nothing long")
    return p


def _parse(args) -> tuple[list[Task], list[str], list[int], dict[str, Any]] | str:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        return f"--tasks: unknown {', '.join(bad) or '(none)'}; allowed: {', '.join(TASKS)}"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {m for spec in METHODS.values() for m in spec}
    if not methods or any(m not in known for m in methods):
        return f"--methods: unknown {', '.join(m for m in methods if m not in known) or '(none)'}; allowed: " \
               f"{', '.join(sorted(known))}"
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        return f"--seeds: expected comma-separated integers, got {args.seeds!r}"
    if not seeds or any(s < 0 for s in seeds):
        return f"--seeds: expected integers >= 0, got {args.seeds!r}"
    if args.budget is not None and args.budget < 1:
        return f"--budget must be >= 1, got {args.budget}"
    if args.eval_points < 1:
        return f"--eval-points must be >= 1, got {args.eval_points}"
    try:
        overrides = parse_overrides(args.set)
    except ConfigError as exc:
        return str(exc)
    chosen = [TASKS[t] if args.budget is None else Task(**{**asdict(TASKS[t]), "budget": args.budget,
                                                            "units_per_query": TASKS[t].units_per_query})
              for t in tasks]
    for task in chosen:  # a misspelt or inapplicable --set fails here, in one line, before anything runs
        for method in [m for m in methods if m in METHODS[_family(task)]]:
            try:
                resolve_config(get_problem(task.problem).config_model, method_settings(task, method, seeds[0]), None,
                               args.set, name=task.problem)
            except ConfigError as exc:
                return f"--set ({task.name}, {method}): {exc}"
    return chosen, methods, seeds, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parsed = _parse(args)
    if isinstance(parsed, str):
        print(f"error: {parsed}", file=sys.stderr)
        return 2
    tasks, methods, seeds, overrides = parsed
    jobs = [(t, m, s) for t in tasks for m in methods if m in METHODS[_family(t)] for s in seeds]
    if args.estimate:
        total = 0.0
        for task in tasks:
            for method in [m for m in methods if m in METHODS[_family(task)]]:
                info = probe(task, method, seeds[0], time_steps=True, overrides=overrides)
                steps = max(0, task.budget - info.setup_queries) // info.step_queries
                cost = steps * info.step_s * len(seeds)
                total += cost
                print(f"{task.name:18s} {method:12s} d={info.dim:<7d} {info.step_queries:>6d} queries/step "
                      f"{steps:>6d} steps  {info.step_s * 1e3:8.1f} ms/step  ~{cost / 60:6.1f} min for "
                      f"{len(seeds)} seed(s)")
        print(f"total ~{total / 60:.1f} min (training only; setup and evaluations extra)")
        return 0
    if args.report and not args.out:
        print("error: --report needs --out (the folder of an earlier study)", file=sys.stderr)
        return 2
    out = experiment_dir(args.out, "efficiency")
    cache = out / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.perf_counter()
    for i, (task, method, seed) in enumerate(jobs, 1):
        cached = (cache / f"{task.name}__{method}__s{seed}.json").exists()
        if args.report and not cached:
            continue
        t0 = time.perf_counter()
        r = run_one(task, method, seed, args.eval_points, cache, overrides)
        results.append(r)
        note = r.get("skipped") or (f"{task.metric} {r['final']:.4f} at {r['queries']:,} queries, target at "
                                    f"{r['queries_to_target'] if r['queries_to_target'] is not None else '-'}; "
                                    f"train {r['train_wall_s']:.1f} s ({r.get('train_cpu_s', float('nan')):.1f} "
                                    "CPU s)")
        print(f"[{i}/{len(jobs)}] {task.name} {method} seed {seed}: {note}"
              f"{' (cached)' if cached else f' ({time.perf_counter() - t0:.0f} s)'}", flush=True)
    if not results:
        print(f"error: no finished runs in {cache}", file=sys.stderr)
        return 1
    used = {"tasks": [t.name for t in tasks], "methods": methods, "seeds": seeds, "budgets": {
        t.name: t.budget for t in tasks}, "eval_points": args.eval_points, "overrides": overrides,
        "wall_s": round(time.perf_counter() - started, 1)}
    summary = write_outputs(out, tasks, results, used)
    print((out / "efficiency.md").read_text())
    print(f"wrote {out}/efficiency.md, efficiency_rows.csv, <task>.csv/.md/.png, summary.json")
    return 0 if summary["winners"] else 1
