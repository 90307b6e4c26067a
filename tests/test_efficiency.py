"""The efficiency study (problems/experiments/efficiency.py): its bookkeeping (queries to a target, the
winner, the crossover statement) on hand-made results, and a tiny real study that fits its budget,
caches every run and resumes from the cache."""

import json
import math

import pytest
import torch

from problems.experiments.efficiency import (TASKS, Task, crossover, fitted_step_schedule, main, queries_to_target,
                                             run_one, study_table, winner)


def test_queries_to_target_is_the_first_evaluation_that_meets_it():
    curve = [(100, 0.5), (200, 0.93), (300, 0.95), (400, 0.92), (500, 0.96)]
    assert queries_to_target(curve, 0.94, True) == 300
    assert queries_to_target(curve, 0.97, True) is None
    mae = [(100, 0.05), (200, 0.033), (300, 0.0327), (400, 0.031)]
    assert queries_to_target(mae, 0.0327, False) == 300
    assert queries_to_target([], 0.1, False) is None


def _run(method, seed, qtt, final, task="digits-w8", dim=3818, wall=1.0):
    return {"task": task, "method": method, "seed": seed, "dim": dim, "queries_to_target": qtt, "final": final,
            "queries": 30000, "units_consumed": 30000 * 64, "train_wall_s": wall, "curve": []}


def test_table_and_winner_need_every_seed_to_reach_the_target():
    task = TASKS["digits-w8"]
    results = [_run("es", 0, 20000, 0.95), _run("es", 1, 26000, 0.95), _run("es", 2, None, 0.93),
               _run("sep-cma-es", 0, 28000, 0.95), _run("sep-cma-es", 1, 29000, 0.945),
               _run("sep-cma-es", 2, 27000, 0.96)]
    rows = {r["method"]: r for r in study_table(task, results)}
    assert rows["es"]["reached"] == "2/3" and math.isnan(rows["es"]["queries_to_target"])
    assert rows["sep-cma-es"]["queries_to_target"] == pytest.approx(28000)
    assert rows["sep-cma-es"]["worst_queries_to_target"] == 29000
    assert rows["es"]["test_acc_at_budget"] == pytest.approx((0.95 + 0.95 + 0.93) / 3)
    # es is faster on two seeds but misses on one: the method that always reaches the target wins
    assert winner(task, list(rows.values()))["method"] == "sep-cma-es"
    # nobody reaches it: the best metric at the budget wins (lower is better for an error)
    mae = Task("m", "wake-flow", {}, "test_mae", 0.01, False, 100, "simulation steps")
    rows = study_table(mae, [_run("es", 0, None, 0.03, "m"), _run("rge", 0, None, 0.02, "m")])
    assert winner(mae, rows) == {"method": "rge", "by": "test_mae at the budget", "value": 0.02}


def test_a_step_schedule_is_stretched_to_the_run_and_keeps_its_decays_at_the_same_fractions():
    from blackbox_zo.optim import build_scheduler
    from problems.certified_defense import CertifiedDefenseProblem

    defaults = CertifiedDefenseProblem().default_config()  # Appx. G: /10 every 4 of 20 epochs
    assert fitted_step_schedule(defaults, 20.0) == {"schedule": {"step_every_epochs": 4}}  # its own length
    assert fitted_step_schedule(defaults, 362.5) == {"schedule": {"step_every_epochs": 72}}  # ES: 18x the epochs
    assert fitted_step_schedule(defaults, 1.0) == {"schedule": {"step_every_epochs": 1}}  # never below one epoch
    assert fitted_step_schedule({"schedule": {"name": "cosine"}, "run": {"epochs": 5}}, 50.0) == {}
    # the lr at each fifth of a 4x longer run equals the default's at each fifth of its own
    from blackbox_zo.config import StepSchedule

    def lrs(every, epochs, spe=10):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = build_scheduler(StepSchedule(step_every_epochs=every, gamma=0.1), opt, epochs * spe, spe)
        return [sched.lr_lambdas[0](int(f * epochs * spe)) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]

    every = fitted_step_schedule(defaults, 80.0)["schedule"]["step_every_epochs"]
    assert lrs(4, 20) == pytest.approx([1, 0.1, 0.01, 1e-3, 1e-4])
    assert lrs(every, 80) == pytest.approx(lrs(4, 20))


def test_held_target_is_where_the_curve_stays_at_the_target():
    curve = [(100, 0.35), (200, 0.30), (300, 0.33), (400, 0.31), (500, 0.305)]
    assert queries_to_target(curve, 0.31, False) == 200  # the first dip
    assert queries_to_target(curve, 0.31, False, held=True) == 400  # it left 0.31 at 300, back for good at 400
    assert queries_to_target(curve, 0.30, False, held=True) is None  # the end is above it
    assert queries_to_target(curve, 0.40, False, held=True) == 100
    assert queries_to_target([], 0.3, False, held=True) is None


def test_queries_to_target_are_read_from_the_curve_so_a_new_target_needs_no_new_runs():
    task = Task("t", "certified-defense", {}, "test_noisy_loss", 0.31, False, 6000, "images")
    run = {**_run("cge", 0, None, 0.29, task.name, 289), "curve": [(0, 0.35), (3000, 0.32), (6000, 0.29)]}
    rows = study_table(task, [run])
    assert rows[0]["queries_to_target"] == 6000 and rows[0]["reached"] == "1/1"
    rows = study_table(Task(**{**vars(task), "target": 0.33}), [run])
    assert rows[0]["queries_to_target"] == 3000
    assert math.isnan(study_table(Task(**{**vars(task), "target": 0.2}), [run])[0]["queries_to_target"])


def test_a_target_taken_from_the_default_on_each_seed():
    """certified-defense: seed s's target is the default's (cge's) loss at the budget on seed s, within
    1%, held to the end; the levels differ by seed, so one number would not do."""
    task = TASKS["certified-defense"]
    assert (task.target_from, task.target_slack, task.held, task.higher_is_better) == ("cge", 0.01, True, False)

    def run(method, seed, curve):
        return {**_run(method, seed, None, curve[-1][1], task.name, 289), "curve": curve}

    results = [run("cge", 0, [(10, 0.34), (20, 0.312), (30, 0.310), (40, 0.300)]),  # target 0.303
               run("cge", 1, [(10, 0.25), (20, 0.205), (30, 0.201), (40, 0.200)]),  # target 0.202
               run("sparse-cge", 0, [(10, 0.30), (20, 0.29), (30, 0.29), (40, 0.29)]),
               run("sparse-cge", 1, [(10, 0.21), (20, 0.20), (30, 0.20), (40, 0.20)]),
               run("es", 0, [(10, 0.29), (20, 0.32), (30, 0.31), (40, 0.31)]),  # a dip, then above: not held
               run("es", 1, [(10, 0.19), (20, 0.19), (30, 0.19), (40, 0.19)])]
    rows = {r["method"]: r for r in study_table(task, results)}
    assert rows["cge"]["queries_to_target"] == pytest.approx(35) and rows["cge"]["reached"] == "2/2"
    assert rows["sparse-cge"]["queries_to_target"] == pytest.approx(15)
    assert rows["es"]["reached"] == "1/2" and math.isnan(rows["es"]["queries_to_target"])
    assert winner(task, list(rows.values()))["method"] == "sparse-cge"
    # a seed without the default's run has no target yet: nothing on it counts as reached
    assert study_table(task, [run("es", 2, [(10, 0.1)])])[0]["reached"] == "0/1"


def test_crossover_names_the_first_width_where_sparse_cge_is_ahead():
    tables = {}
    for name, dim, sparse_q, es_q in (("digits-w8", 3818, None, 20000), ("digits-w32", 29066, 25000, 40000),
                                      ("digits-w64", 94986, 10000, None)):
        results = [_run("sparse-cge", 0, sparse_q, 0.95 if sparse_q else 0.5, name, dim),
                   _run("es", 0, es_q, 0.95 if es_q else 0.6, name, dim)]
        tables[name] = study_table(TASKS[name], results)
    text = crossover(tables)
    assert "overtakes the evolution strategies at d = 29066 (digits-w32)" in text
    assert "digits-w64" not in text  # the first width is the answer
    tables.pop("digits-w32"), tables.pop("digits-w64")
    assert "does not overtake" in crossover(tables)


def test_a_tiny_study_fits_its_budget_caches_and_resumes(tmp_path, capsys):
    args = ["--tasks", "digits-w8", "--methods", "es", "--seeds", "0", "--budget", "300", "--eval-points", "2",
            "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "digits-w8 es seed 0" in out and "(cached)" not in out
    cached = tmp_path / "runs" / "digits-w8__es__s0.json"
    run = json.loads(cached.read_text())
    # ES: 2 x 14 = 28 queries a step: the budget pays for 10 steps, and the run took exactly those
    assert run["step_queries"] == 28 and run["steps"] == 10 and run["queries"] == 280
    assert run["units_consumed"] == 280 * 64
    qs = [q for q, _ in run["curve"]]
    assert qs == sorted(qs) and qs[-1] == 280 and qs[0] >= 150  # every budget/2 = 150 queries, then the end
    assert run["settings"]["run"]["max_steps"] == 10
    assert 0 < run["train_cpu_s"] < 60  # process CPU of the 10 steps, evaluations excluded
    stamp = cached.stat().st_mtime_ns
    assert main(args) == 0
    assert "(cached)" in capsys.readouterr().out and cached.stat().st_mtime_ns == stamp
    for name in ("efficiency.md", "digits-w8.csv", "digits-w8.md", "digits-w8.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["budgets"] == {"digits-w8": 300} and summary["winners"]["digits-w8"]["method"] == "es"
    # --report tabulates what is cached and runs nothing (seed 1 and rge are not cached: left out)
    report = ["--tasks", "digits-w8", "--methods", "es,rge", "--seeds", "0,1", "--budget", "300", "--out", str(tmp_path)]
    assert main([*report, "--report"]) == 0
    assert "seed 1" not in capsys.readouterr().out and not (tmp_path / "runs" / "digits-w8__rge__s0.json").exists()


def test_a_whole_run_task_keeps_the_methods_own_length(tmp_path):
    """fit_to_budget=False (digits-w8-run): the method runs its own settings (here 4 steps of the two-phase
    default's phase 1: subspace CGE, 10 outputs x rank 16 + 1 = 161 queries a step), not as many steps as the
    budget pays for."""
    task = Task("tiny-run", "digits", {"model": {"width": 2}, "run": {"max_steps": 4}}, "test_acc", 0.94, True,
                1_000_000, "images", fit_to_budget=False)
    run = run_one(task, "subspace+sparse-cge", 0, 2, tmp_path)
    assert run["steps"] == 4 and run["step_queries"] == 161 and run["queries"] == run["setup_queries"] + 4 * 161
    assert run["settings"]["run"]["max_steps"] == 4 and run["settings"]["phase2"]["after_steps"] == 186
    from problems.digits import DigitsProblem
    from problems.experiments.efficiency import images_per_query

    p = DigitsProblem()  # images a query: both phases of the default on 64 (phase1/phase2.batch_size), the recipe 16
    assert images_per_query(p.resolve_config()) == 64
    assert images_per_query(p.resolve_config(overrides=["phase2=none"])) == 16
    assert math.isnan(images_per_query(p.resolve_config(overrides=["phase2.batch_size=16"])))
    assert run["settings"]["run"]["query_budget"] == 1_000_000


def test_set_applies_to_every_run_and_is_recorded(tmp_path):
    args = ["--tasks", "digits-w8", "--methods", "es", "--seeds", "0", "--budget", "300", "--eval-points", "1",
            "--set", "estimator.q=5", "--set", "optimizer.lr=0.02", "--out", str(tmp_path)]
    assert main(args) == 0
    run = json.loads((tmp_path / "runs" / "digits-w8__es__s0.json").read_text())
    # 2 x 5 = 10 queries a step (the method's own q is 14): the budget of 300 pays for 30 steps
    assert run["step_queries"] == 10 and run["steps"] == 30 and run["queries"] == 300
    assert run["settings"]["estimator"]["q"] == 5 and run["settings"]["optimizer"]["lr"] == 0.02
    assert run["overrides"] == {"estimator": {"q": 5}, "optimizer": {"lr": 0.02}}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["overrides"] == run["overrides"]
    assert summary["methods"]["digits-w8"]["es"]["estimator"]["q"] == 5


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "digits-w9"], "--tasks: unknown digits-w9"),
    (["--methods", "magic"], "--methods: unknown magic"),
    (["--seeds", "a"], "--seeds"),
    (["--budget", "0"], "--budget must be >= 1"),
    (["--set", "estimator.q"], "--set expects key.path=value"),
    (["--methods", "es", "--set", "estimator.nonsense=3"], "--set (digits-w8, es)"),
    (["--methods", "sep-cma-es", "--set", "estimator.q=3"], "--set (digits-w8, sep-cma-es)"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["sep-cma-es-fc", "es-fc", "es-grasp-fc"])
def test_last_layer_methods_search_the_linear_layer_only(method):
    """The -fc methods resolve for every digits width and their oracle's space is the linear layer:
    2w * 16 * 10 + 10 parameters (10,250 at width 32)."""
    from blackbox_zo.config import resolve_config
    from blackbox_zo.problem import get_problem
    from problems.experiments.efficiency import method_settings

    for task, width in (("digits-w8", 8), ("digits-w32", 32), ("digits-w64", 64)):
        problem = get_problem("digits")
        cfg = resolve_config(problem.config_model, method_settings(TASKS[task], method, 0))
        assert cfg.model.width == width and cfg.model.frozen_convs == 2
        if width == 32:
            space = problem.setup(cfg).oracle.space
            assert space.dim == 2 * width * 16 * 10 + 10 == 10_250
            assert space.names == ["6.weight", "6.bias"]


def test_fitting_a_warm_started_sol_run_to_the_budget_keeps_the_non_methods_warm_start(tmp_path, monkeypatch):
    """A NON warm start spends no queries and takes, unless told, the run's own number of steps (the NON
    method's default). Fitting the run to the budget rewrites run.epochs; the warm start stays at the
    problem's run length (wake-small: 800 NON steps, not the 430 of the 43 fitted epochs)."""
    from problems.experiments import efficiency
    from problems.sol import SolProblem

    small = {"cells": 16, "hifi_factor": 4, "record_steps": 24, "train_runs": 3, "test_runs": 2, "limiter": "minmod",
             "hifi_limiter": "same"}
    sol = {"simulator_options": small, "cache_dir": str(tmp_path / "cache"), "width": 4, "depth": 1,
           "batches_per_epoch": 5}
    monkeypatch.setitem(efficiency.METHODS, "sol", {"warm": {"sol": {"warm_start": "non"}},
                                                    "cold": {"sol": {"warm_start": "none"}}})
    task = Task("burgers-tiny", "sol", {"sol": sol, "run": {"epochs": 2, "threads": 1}}, "test_mae", 0.0, False,
                900, "simulation steps")
    (tmp_path / "runs").mkdir()
    warm = run_one(task, "warm", 0, 1, tmp_path / "runs")
    steps = warm["steps"]
    assert warm["settings"]["run"]["max_steps"] == steps and warm["settings"]["run"]["epochs"] * 5 != 2 * 5
    assert warm["settings"]["sol"]["warm_start_steps"] == 2 * 5  # the problem's run: 2 epochs of 5 batches
    # a cold run has no warm start to pin; an explicit warm_start_steps is kept
    cold = run_one(task, "cold", 0, 1, tmp_path / "runs")
    assert cold["settings"]["sol"]["warm_start_steps"] is None
    problem = SolProblem()
    base = efficiency.method_settings(task, "warm", 0)
    assert efficiency.pinned_warm_start(problem, base, 5) == {"sol": {"warm_start_steps": 10}}
    assert efficiency.pinned_warm_start(problem, {**base, "sol": {**sol, "warm_start": "non",
                                                                  "warm_start_steps": 3}}, 5) == {}
