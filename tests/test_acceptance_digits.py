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
    summary = run("estimator=cge", "estimator.mu=0.005", "run.epochs=8", "sparsity.enabled=false", "data.batch_size=64")
    assert summary["zeroth_order"] and summary["test_acc"] >= 0.93
    assert summary["queries"]["prune"] == 0


def test_fo_reference_reaches_095():
    summary = run("estimator=autograd", "run.epochs=8", "data.batch_size=64")
    assert not summary["zeroth_order"] and summary["test_acc"] >= 0.95


def test_default_two_phase_run_reaches_095():
    # The default: ZO-GraSP (2 (192 + 1) = 386 queries, phase `prune`) for phase 2's sparsity, subspace CGE on the
    # last layer (10 outputs x rank 16 + the base: 161 queries a step, 64-image batches) for 186 steps, then
    # Sparse-CGE at 90% sparsity of the weights (378 of 3,784 weights + 34 dense biases = 412 coordinates, 413
    # queries a step) to the end of 12 epochs of 22 batches (264 steps). Measured (docs/efficiency.md): 0.9667 /
    # 0.9750 / 0.9667 for run.seed 0 / 1 / 2.
    summary = run()
    assert summary["zeroth_order"] and summary["test_acc"] >= 0.95
    assert summary["steps"] == 12 * 22 and summary["phase2"] == {"estimator": "cge", "from_step": 186, "reached": True}
    assert summary["queries"]["prune"] == 386
    assert summary["queries"]["train"] == 186 * 161 + (summary["steps"] - 186) * 413


def test_deepzero_recipe_reaches_093():
    # DeepZero's recipe alone (the default before the two-phase run): ZO-GraSP, then Sparse-CGE for
    # 10 epochs. Since ZO-GraSP's two RGE estimates share all their directions (332354c, eq. (3)), seeds 0-9
    # give 0.9561 +- 0.0081 (benchmarks/seed_study.py, docs/sparsity.md) and seed 0 0.9417 (before: 0.9667;
    # 0.9619 +- 0.0064 over seeds 0-9). The floor is that 10-seed mean minus 3 std (0.932), not seed 0's value.
    # The --set values that give it are the ones docs/digits.md lists.
    summary = run("estimator=cge", "estimator.mu=0.005", "run.epochs=10", "phase2=none")
    assert summary["zeroth_order"] and summary["test_acc"] >= 0.93 and "phase2" not in summary
    assert summary["queries"]["prune"] == 386
    assert summary["queries"]["train"] == summary["steps"] * 413 == 890 * 413

