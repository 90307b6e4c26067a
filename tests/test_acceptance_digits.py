"""Opt-in acceptance runs of the main job (`make test-slow`): minutes each on 2 cores."""

import pytest

from blackbox_zo.config import resolve_config
from blackbox_zo.trainer import train
from problems.digits import DigitsProblem

pytestmark = pytest.mark.slow


def run(*overrides):
    p = DigitsProblem()
    return train(p, resolve_config(p.config_model, p.default_config(), overrides=["run.progress=false", *overrides]))


def test_dense_cge_reaches_093():
    summary = run("estimator=cge", "estimator.mu=0.005", "run.epochs=8")
    assert summary["zeroth_order"] and summary["test_acc"] >= 0.93


def test_fo_reference_reaches_095():
    summary = run("estimator=autograd", "run.epochs=8")
    assert not summary["zeroth_order"] and summary["test_acc"] >= 0.95


def test_default_recipe_reaches_095():
    summary = run()
    assert summary["zeroth_order"] and summary["test_acc"] >= 0.95
