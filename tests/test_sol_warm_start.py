"""`sol.warm_start=non` (and the wake flow's `wake.warm_start=non`): the corrector pre-trained exactly as
the NON method, then the solver-in-the-loop run from there (problems/sol/methods.py: warm_start_non).

On the small Burgers configuration of test_sol.py (NumPy solver, no gradient through it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blackbox_zo.config import ConfigError, resolve_config
from problems.sol import SolProblem
from problems.sol.experiment import main as experiment
from resume_helpers import stop_and_resume

SMALL = {"cells": 16, "hifi_factor": 4, "record_steps": 24, "train_runs": 3, "test_runs": 2, "limiter": "minmod",
         "hifi_limiter": "same"}


def settings(tmp_path: Path, *extra: str) -> list[str]:
    return [f"sol.simulator_options.{k}={v}" for k, v in SMALL.items()] + [
        f"sol.cache_dir={tmp_path / 'cache'}", "sol.width=4", "sol.depth=1", "run.epochs=2", "sol.batches_per_epoch=5",
        "optimizer.lr=3e-3", *extra]


def config(tmp_path: Path, *extra: str):
    problem = SolProblem()
    return problem, resolve_config(problem.config_model, problem.default_config(), None,
                                   settings(tmp_path, "run.progress=false", *extra))


def test_the_warm_start_is_the_non_methods_corrector_bitwise_and_its_cost_is_reported(tmp_path):
    """The experiment's NON method (its own code path: pairs, seed, steps, batch and lr defaults) and
    a run's warm start give the same weights, bit for bit; the run then starts there, its queries
    are the cold run's (the warm start spends none), and summary.json names the warm start's cost."""
    # the method sets warm_start itself: a --set does not turn the paper's ZO-SOL into a warm-started one
    args = ["--methods", "NON,ZO-SOL,NON+ZO-SOL", "--seeds", "1", "--no-progress", "--out", str(tmp_path / "exp")]
    assert experiment(args + [a for s in settings(tmp_path, "sol.warm_start=non") for a in ("--set", s)]) == 0
    non = torch.load(tmp_path / "exp" / "seed1" / "non.pt", weights_only=True)

    problem, cfg = config(tmp_path, "sol.warm_start=non", "run.seed=1")
    setup = problem.setup(cfg)
    warm = setup.module.state_dict()
    assert warm.keys() == non.keys() and all(torch.equal(warm[k], non[k]) for k in non)
    _, cold_cfg = config(tmp_path, "run.seed=1")
    cold = problem.setup(cold_cfg).module.state_dict()
    assert not torch.equal(cold["net.0.weight"], warm["net.0.weight"])  # it did move the corrector

    info = setup.extras["warm_start"]
    # 3 training runs x 24 one-step pairs (25 frames each); steps/batch/lr default to the run's 2 x 5 steps, windows x unroll, optimizer.lr
    assert (info["pairs"], info["simulation_steps"], info["steps"], info["batch"], info["lr"]) == (72, 72, 10, 32, 3e-3)
    assert info["cpu_s"] >= 0 and info["wall_s"] > 0

    from blackbox_zo.trainer import train
    warm_summary = train(problem, cfg, run_dir=tmp_path / "warm")
    cold_summary = train(problem, cold_cfg, run_dir=tmp_path / "cold")
    assert warm_summary["warm_start"] == json.loads((tmp_path / "warm" / "summary.json").read_text())["warm_start"]
    assert warm_summary["warm_start"]["pairs"] == 72 and "warm_start" not in cold_summary
    assert warm_summary["queries"] == cold_summary["queries"]  # the pairs are no queries
    assert warm_summary["test_mae"] != cold_summary["test_mae"]

    # the experiment's ZO-SOL is the cold run, its NON+ZO-SOL the warm one, bit for bit
    from blackbox_zo.rundir import CHECKPOINT_NAME
    for slug, run in (("zo-sol", "cold"), ("non-zo-sol", "warm")):
        ours = torch.load(tmp_path / "exp" / "seed1" / f"{slug}.pt", weights_only=True)
        theirs = torch.load(tmp_path / run / CHECKPOINT_NAME, weights_only=True)["module"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), slug
    table = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert table["methods"] == ["NON", "ZO-SOL", "NON+ZO-SOL"]
    assert table["summaries"]["NON+ZO-SOL/seed1"]["warm_start"]["pairs"] == 72
    assert "warm_start" not in table["summaries"]["ZO-SOL/seed1"]


def test_the_warm_start_settings_are_used_and_checked(tmp_path):
    problem, cfg = config(tmp_path, "sol.warm_start=non", "sol.warm_start_steps=3", "sol.warm_start_batch=5",
                          "sol.warm_start_lr=1e-2")
    info = problem.setup(cfg).extras["warm_start"]
    assert (info["steps"], info["batch"], info["lr"]) == (3, 5, 1e-2)
    # zero steps: the pairs are made, the corrector is the cold one
    problem, cfg = config(tmp_path, "sol.warm_start=non", "sol.warm_start_steps=0")
    zero = problem.setup(cfg).module.state_dict()
    cold = problem.setup(config(tmp_path)[1]).module.state_dict()
    assert all(torch.equal(zero[k], cold[k]) for k in cold)
    for bad, field in (("sol.warm_start=fo", "sol.warm_start"), ("sol.warm_start_steps=-1", "sol.warm_start_steps"),
                       ("sol.warm_start_lr=0", "sol.warm_start_lr")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            config(tmp_path, bad)


def test_a_warm_started_run_resumes_bitwise(tmp_path):
    """Stopped after 4 of 10 steps and resumed: the warm start is redone at setup (deterministic) and the
    checkpoint's weights, optimizer and coordinates take over; it ends bitwise where the whole run ends."""
    def make(*extra: str):
        return config(tmp_path, "sol.warm_start=non", "sparsity.enabled=true", "sparsity.sparsity=0.5", *extra)

    full, resumed, _, _ = stop_and_resume(make, tmp_path, stop_at=4, metric="test_mae")
    assert full["warm_start"]["pairs"] == resumed["warm_start"]["pairs"]
