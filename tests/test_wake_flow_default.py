"""The wake flow's default method follows the efficiency study (issue 16, item 4), and DeepZero's
ZO-SOL stays what it was wherever it is named.

`blackbox-zo train wake-flow` is NON's warm start then ES (the study's `non+es`, which won the
wake-tiny row on every seed); the experiment's ZO-SOL / NON+ZO-SOL / FO-SOL / NON and the efficiency
study's wake methods pin DeepZero's Sparse-CGE (`problems.wake_flow.ZO_SOL`). The snapshot
tests/data/wake_flow_configs_5c00913.json holds every one of those configs as resolved by main at
5c00913, before the default changed (written by the same resolution run on main's own code). No
data and no simulation: settings only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blackbox_zo.config import active_sparsity, deep_merge, resolve_config
from blackbox_zo.estimators import make_estimator
from blackbox_zo.problem import get_problem
from problems.experiments import efficiency
from problems.sol import experiment as sol_experiment
from problems.sol.problem import SolProblem
from problems.wake_flow.problem import QUICK, ZO_SOL, WakeFlowProblem

SNAPSHOT = Path(__file__).parent / "data" / "wake_flow_configs_5c00913.json"
# The old default (DeepZero's ZO-SOL from NON's corrector) from the new one, as docs/wake-flow.md gives it
OLD_DEFAULT = ["estimator=cge", "sparsity.enabled=true", "run.epochs=80", "run.eval_every_epochs=80",
               "wake.warm_start_steps=null"]
EXPERIMENT_ARGS = {"wake-flow": ([], ["--quick"], ["--paper-scale"], ["--set", "optimizer.lr=3e-4"]),
                   "sol": ([], ["--quick"])}


def _step_queries(config) -> int:
    """Queries of one step of a dense estimator (its plan, nothing evaluated) on the tiny corrector."""
    return make_estimator(config.estimator).plan(torch.zeros(506), seed=0).num_queries


def _study_config(task: str, method: str):
    """An efficiency-study method's config before its steps are fitted to the budget (what run_one
    resolves, less run.max_steps / epochs / query_budget / eval_every_epochs, which need a probe)."""
    t = efficiency.TASKS[task]
    problem = get_problem(t.problem)
    base = efficiency.method_settings(t, method, 0)
    return resolve_config(problem.config_model, deep_merge(base, efficiency.pinned_warm_start(problem, base, 10)))


def _resolved() -> dict:
    out: dict = {"efficiency": {}, "experiment": {}, "default": {"sol": SolProblem().resolve_config().model_dump(mode="json")}}
    for task in ("wake-tiny", "wake-small"):
        for method in efficiency.METHODS["wake-flow"]:
            out["efficiency"][f"{task}/{method}"] = _study_config(task, method).model_dump(mode="json")
    for problem in (WakeFlowProblem(), SolProblem()):
        names = [m for m in ("NON", "FO-SOL", "ZO-SOL", "NON+ZO-SOL") if m != "FO-SOL" or problem.name == "wake-flow"]
        for argv in EXPERIMENT_ARGS[problem.name]:
            args = sol_experiment.build_parser(problem).parse_args(argv + ["--methods", ",".join(["SRC", *names])])
            config, methods, _ = sol_experiment.resolve(args, problem)
            assert methods == ["SRC", *names]
            for name in names:
                out["experiment"][f"{problem.name} {' '.join(argv)}/{name}"] = sol_experiment.method_config(
                    config, name, problem).model_dump(mode="json")
    return out


def _restricted(now, then):
    """`now` with only the keys `then` has, recursively: a setting added after the snapshot is not a change."""
    if isinstance(now, dict) and isinstance(then, dict):
        return {k: _restricted(now[k], then[k]) if k in now else "<missing>" for k in then}
    return now


def test_the_default_is_non_then_es_with_the_studys_settings_at_zo_sols_budget():
    config = WakeFlowProblem().resolve_config()
    est = config.estimator
    assert (est.kind, est.q, est.mu, est.shaping, est.blocks) == ("es", 8, 1e-3, "centered-ranks", None)
    assert (config.optimizer.name, config.optimizer.lr) == ("adam", 1e-3)
    assert (config.schedule.name, config.schedule.min_lr_ratio) == ("cosine", 0.1)
    assert active_sparsity(config) is None  # every coordinate, no ZO-GraSP
    w = config.wake
    assert (w.warm_start, w.warm_start_steps, w.corrector) == ("non", 800, "tiny")  # NON's own 800 steps
    steps = config.run.epochs * w.batches_per_epoch
    task = efficiency.TASKS["wake-tiny"]
    assert steps == 1_600 and steps * _step_queries(config) == task.budget == 25_600
    # ... which is the study's `non+es` run: the same sections, and its steps fitted to the same budget
    study = _study_config("wake-tiny", "non+es")
    for section in ("estimator", "optimizer", "schedule", "sparsity", "wake"):
        assert getattr(config, section).model_dump() == getattr(study, section).model_dump(), section
    assert task.budget // _step_queries(study) == steps
    # and the experiment's NON+ES is this run
    problem = WakeFlowProblem()
    args = sol_experiment.build_parser(problem).parse_args(["--methods", "SRC,NON+ES"])
    own = sol_experiment.default_run_config(args, problem)
    assert own.model_dump() == config.model_dump()


def test_zo_sol_stays_deepzeros_sparse_cge_in_the_experiment_and_from_the_documented_recipe():
    problem = WakeFlowProblem()
    args = sol_experiment.build_parser(problem).parse_args([])
    config, methods, _ = sol_experiment.resolve(args, problem)
    assert methods == ["SRC", "NON", "FO-SOL", "ZO-SOL"]  # the paper's four; NON+ES on request
    for name, start in (("ZO-SOL", "none"), ("NON+ZO-SOL", "non")):
        zo = sol_experiment.method_config(config, name, problem)
        assert (zo.estimator.kind, zo.estimator.mu, zo.estimator.scheme) == ("cge", 1e-3, "forward")
        sparsity = active_sparsity(zo)
        assert sparsity is not None and (sparsity.method, sparsity.sparsity) == ("random", 0.95)
        assert (zo.optimizer.name, zo.optimizer.lr, zo.schedule.name) == ("adam", 1e-3, "cosine")
        assert zo.run.epochs * zo.wake.batches_per_epoch == 800
        assert (zo.wake.warm_start, zo.wake.warm_start_steps) == (start, None)  # NON+ZO-SOL: as long as the run
    fo = sol_experiment.method_config(config, "FO-SOL", problem)
    assert fo.estimator.kind == "autograd" and fo.run.epochs == 80 and fo.wake.warm_start == "none"
    # `train wake-flow` with the documented recipe is the old default, i.e. the experiment's config
    recipe = problem.resolve_config(overrides=OLD_DEFAULT)
    assert recipe.model_dump() == problem.resolve_config(base=deep_merge(problem.default_config(), ZO_SOL)).model_dump()
    assert recipe.model_dump() == config.model_dump()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "wake-flow.md").read_text()
    assert " ".join(f"--set {s}" for s in OLD_DEFAULT) in doc


def test_every_zo_sol_config_resolves_as_on_main_before_the_default_changed():
    """ZO-SOL, NON+ZO-SOL, FO-SOL and NON in `experiment wake-flow` (default, --quick, --paper-scale, a --set),
    `experiment sol` (burgers), the sol problem's default and every wake method of the efficiency study: equal,
    setting for setting, to main's at 5c00913 (so also their cache keys, and so their runs bit for bit)."""
    then = json.loads(SNAPSHOT.read_text())
    now = _resolved()
    for part in ("default", "efficiency", "experiment"):
        assert sorted(now[part]) == sorted(then[part]), part
        for key in then[part]:
            assert _restricted(now[part][key], then[part][key]) == then[part][key], (part, key)


def test_quick_smoke_settings_fit_both_the_default_and_zo_sol():
    problem = WakeFlowProblem()
    quick = problem.resolve_config(overrides=problem.quick_overrides(problem.resolve_config()))
    assert quick.estimator.kind == "es" and quick.run.epochs == 2
    assert quick.wake.warm_start_steps is None  # a smoke run's warm start is as short as the run
    assert list(QUICK) == problem.quick_overrides(problem.resolve_config())  # no ZO-GraSP q without sparsity
    zo = problem.resolve_config(base=deep_merge(problem.default_config(), ZO_SOL))
    assert problem.quick_overrides(zo) == [*QUICK, "sparsity.q=4"]


def test_non_plus_es_is_the_wake_flows_alone(capsys):
    with pytest.raises(SystemExit) as exc:
        sol_experiment.main(["--methods", "SRC,NON+ES"])  # the sol problem's default is ZO-SOL itself
    assert exc.value.code == 2
    assert "--methods: unknown ['NON+ES'] for sol" in capsys.readouterr().err
    assert "NON+ES" in sol_experiment.allowed_methods(WakeFlowProblem())
