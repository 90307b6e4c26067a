"""The estimator study's instruments: the timed estimators are the library's, the reference gradient is
the oracle's function, and the experiment writes the tables it promises."""

import csv

import pytest
import torch

from blackbox_zo.estimators import CGE, RGE
from oracles.model_loss import ModelLossOracle
from problems.experiments.estimators import (
    autograd_gradient,
    cosine_similarity,
    digits_data,
    plain_oracle,
    main,
    make_simple_cnn,
    n_params,
    timed_cge,
    timed_rge,
)


@pytest.fixture(scope="module")
def cnn_and_batch():
    torch.manual_seed(0)
    module = make_simple_cnn(3)
    x, y, _, _ = digits_data(False)
    return module, (x[:32], y[:32])


def test_simple_cnn_is_deepzero_appendix_b():
    # conv(1->w)+BN, conv(w->w)+BN, linear(w->10): 10w + 2w + 9w^2 + w + 2w + 10w + 10 = 9w^2 + 25w + 10
    for w in (2, 4, 8, 16):
        assert n_params(w) == 9 * w * w + 25 * w + 10
    kinds = [type(m).__name__ for m in make_simple_cnn(4)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + ["AdaptiveAvgPool2d", "Flatten", "Linear"]


def test_timed_estimators_are_the_library_estimators(cnn_and_batch):
    # The Table A1 timings are only meaningful if the instrumented code computes the same
    # estimate: same perturbed points, same directions (same generator stream), same arithmetic.
    module, batch = cnn_and_batch
    oracle = plain_oracle(module)
    theta = oracle.initial_theta()
    g_cge, t_cge = timed_cge(oracle, theta, batch, 5e-3)
    torch.testing.assert_close(g_cge, CGE(mu=5e-3).estimate(oracle, theta, batch).grad, rtol=0, atol=0)
    g_rge, t_rge = timed_rge(oracle, theta, batch, q=40, mu=5e-3, seed=7)
    torch.testing.assert_close(g_rge, RGE(q=40, mu=5e-3).estimate(oracle, theta, batch, seed=7).grad, rtol=1e-6, atol=1e-7)
    stages = {"direction_generation", "weight_perturbation", "model_inference", "arithmetic"}
    assert set(t_cge) == set(t_rge) == stages and all(v >= 0 for v in [*t_cge.values(), *t_rge.values()])


def test_reference_gradient_is_the_gradient_of_the_oracles_loss(cnn_and_batch):
    # The cosine table compares against autograd_gradient; it must differentiate the very function the
    # oracle evaluates (batch-norm with batch statistics). Central CGE with mu = 1e-3 in float32
    # has truncation O(mu^2) and rounding ~1e-7 * |l| / mu ~ 2e-4 per coordinate, so it agrees
    # with the true gradient to cosine > 0.999; a reference using running statistics scores ~0.
    module, batch = cnn_and_batch
    oracle = ModelLossOracle(module)
    theta = oracle.initial_theta()
    g = autograd_gradient(module, theta, oracle.space, batch)
    est = CGE(mu=1e-3, scheme="central").estimate(oracle, theta, batch)
    assert cosine_similarity(est.grad, g) > 0.999


def test_experiment_writes_its_tables(tmp_path):
    rc = main(["--skip", "fig2", "--timing-widths", "2", "--timing-reps", "1", "--cosine-width", "2",
               "--cosine-fractions", "0.5,1", "--cosine-seeds", "1", "--out", str(tmp_path), "--no-progress",
               "--threads", "1"])
    assert rc == 0
    for name in ("timing.csv", "timing.md", "timing.png", "cosine.csv", "cosine.md", "cosine.png", "summary.md"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "cosine_runs.csv")))
    full_cge = [float(r["cos"]) for r in rows if r["estimator"].startswith("CGE forward") and float(r["fraction"]) == 1.0]
    assert full_cge and full_cge[0] > 0.99  # CGE with every coordinate is the gradient (forward-difference bias only)
    assert {r["estimator"] for r in rows} >= {"RGE gaussian forward", "linear interpolation (LASSO; m=d: exact)",
                                              "HZO (BN in eval mode)"}
    # budgets are equal: every forward estimator at fraction f spends round(f d) + 1 queries
    d = n_params(2)
    for r in rows:
        if "forward" in r["estimator"] or r["estimator"].startswith("linear"):
            assert int(r["budget_Q"]) == round(float(r["fraction"]) * d) + 1


def test_bad_arguments_exit_with_a_named_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--cosine-fractions", "0,2"])
    assert exc.value.code == 2 and "fractions must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--lrs", "sgd=0.1"])
