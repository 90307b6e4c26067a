"""One registry class (blackbox_zo/registry.py) for oracles, problems, experiments and estimators."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

from blackbox_zo import registry as registry_module
from blackbox_zo.config import ConfigError, TrainConfig, resolve_config
from blackbox_zo.estimators import CGE, ESTIMATORS, RGE, Estimate, PlanEstimator, make_estimator
from blackbox_zo.oracle import ORACLES
from blackbox_zo.plan import QueryPlan
from blackbox_zo.problem import EXPERIMENTS, PROBLEMS
from blackbox_zo.registry import DuplicateNameError, Registry, UnknownNameError, plugin_errors


def test_the_four_kinds_share_one_class_and_their_entry_point_groups():
    groups = {r.kind: r.group for r in (ORACLES, PROBLEMS, EXPERIMENTS, ESTIMATORS)}
    assert groups == {"oracle": "blackbox_zo.oracles", "problem": "blackbox_zo.problems",
                      "experiment": "blackbox_zo.experiments", "estimator": "blackbox_zo.estimators"}
    assert all(isinstance(r, Registry) for r in (ORACLES, PROBLEMS, EXPERIMENTS, ESTIMATORS))
    # this repository's own names, each written once (pyproject.toml entry points / the estimator classes)
    assert {"model-loss-v1", "gym-policy-v1"} <= set(ORACLES.names())
    assert {"digits", "cartpole"} <= set(PROBLEMS.names()) and "estimators" in EXPERIMENTS.names()
    assert ESTIMATORS.names()[:3] == ["cge", "rge", "linear-interpolation"]
    assert ESTIMATORS.get("cge") is CGE and ESTIMATORS["rge"] is RGE


def test_one_rule_for_duplicates():
    reg = Registry("widget")

    class A:
        pass

    class B:
        pass

    assert reg.register("w-v1")(A) is A
    reg.add("w-v1", A)  # the same object again (a module imported twice): fine
    with pytest.raises(DuplicateNameError) as exc:
        reg.register("w-v1")(B)
    msg = str(exc.value)
    assert "widget name 'w-v1' is already registered to" in msg and "A" in msg and "refusing" in msg and "B" in msg
    assert reg.get("w-v1") is A  # the first keeps the name
    with pytest.raises(UnknownNameError, match=r"unknown widget 'w-v2'; known: w-v1"):
        reg.get("w-v2")
    with pytest.raises(ValueError, match="non-empty"):
        reg.add("", A)


def test_entry_points_conflicts_and_broken_plugins_are_reported_not_raised(monkeypatch):
    reg = Registry("gadget")
    import math

    reg.add("sqrt", math.sqrt)
    eps = [EntryPoint("sqrt", "math:floor", reg.group),  # another object under a taken name
           EntryPoint("good", "math:ceil", reg.group),
           EntryPoint("broken", "no_such_module_xyz:thing", reg.group)]
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [e for e in eps if e.group == group])
    try:
        assert reg.names() == ["sqrt", "good"]
        assert reg.get("sqrt") is math.sqrt and reg.get("good") is math.ceil
        assert "already registered" in reg.errors["sqrt"] and "math:floor" in reg.errors["sqrt"]
        assert "ModuleNotFoundError" in reg.errors["broken"]
        with pytest.raises(UnknownNameError, match="'broken' failed to load: ModuleNotFoundError"):
            reg.get("broken")
        errors = plugin_errors()  # what `blackbox-zo list` prints under "failed to load"
        assert "blackbox_zo.gadgets:broken" in errors and "blackbox_zo.gadgets:sqrt" in errors
    finally:
        registry_module._ALL.remove(reg)


class HalfCGE(PlanEstimator):
    """A plug-in estimator: forward CGE scaled by 1/2 (to see it was used)."""

    def __init__(self, mu):
        self.mu = mu

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.mu)

    def plan(self, theta, *, coords=None, seed=None, chunk=256):
        return QueryPlan.coordinates(theta, self.mu, coords)

    def combine(self, plan, losses):
        grad = torch.zeros_like(plan.theta)
        grad[plan.coord_indices()] = 0.5 * losses.differences()
        return Estimate(grad, losses.queries, losses.base_loss())


def test_estimator_kind_resolves_through_the_registry(monkeypatch, quadratic):
    monkeypatch.setattr(ESTIMATORS, "_entries", dict(ESTIMATORS._entries))
    with pytest.raises(ConfigError, match=r"estimator\.kind: Input should be 'cge', 'rge', 'linear-interpolation', "
                                          r"'es', 'guided-es', 'sep-cma-es', 'cma-es', 'subspace-cge' or 'autograd' \(got 'half-cge'\)"):
        resolve_config(TrainConfig, {}, overrides=["estimator=half-cge"])
    ESTIMATORS.register("half-cge")(HalfCGE)
    cfg = resolve_config(TrainConfig, {}, overrides=["estimator=half-cge", "estimator.mu=1e-4"])
    est = make_estimator(cfg.estimator)
    assert isinstance(est, HalfCGE) and est.mu == 1e-4
    theta = quadratic.initial_theta()
    full = CGE(mu=1e-4).estimate(quadratic, theta, None)
    torch.testing.assert_close(est.estimate(quadratic, theta, None).grad, 0.5 * full.grad, rtol=0, atol=0)
    # the unknown-kind message now names it too
    with pytest.raises(ConfigError, match="'subspace-cge', 'half-cge' or 'autograd'"):
        resolve_config(TrainConfig, {}, overrides=["estimator=magic"])


def test_the_trainer_builds_the_configured_estimator(monkeypatch):
    from blackbox_zo.problem import TensorBatches, TrainingSetup
    from blackbox_zo.trainer import Trainer
    from helpers import SmoothBlocks

    monkeypatch.setattr(ESTIMATORS, "_entries", dict(ESTIMATORS._entries))
    ESTIMATORS.register("half-cge")(HalfCGE)
    oracle = SmoothBlocks()
    setup = TrainingSetup(oracle=oracle, train_batches=TensorBatches(torch.zeros(4, 1), batch_size=2))
    cfg = resolve_config(TrainConfig, {}, overrides=["estimator=half-cge", "run.progress=false", "run.epochs=1"])
    trainer = Trainer(setup, cfg)
    assert isinstance(trainer.estimator, HalfCGE)
    summary = trainer.fit()
    assert summary["estimator"] == "half-cge" and summary["queries"]["train"] == 2 * (oracle.space.dim + 1)


def test_list_shows_estimators(capsys):
    from blackbox_zo.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    section = out.split("estimators (")[1]
    for name in ("cge", "rge", "linear-interpolation"):
        assert f"\n  {name} " in section
    assert "hzo" not in section  # HZO is research code (blackbox_zo.contrib), not a registered estimator
