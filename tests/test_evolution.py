"""Evolution strategies (blackbox_zo/evolution.py) against closed forms and against pycma.

* ES: the shaped weights on a hand-computed case; shaping "none" is central Gaussian RGE; on a
  linear function the estimate's expectation is the gradient (raw) or its direction (ranks).
* Guided ES: the sample covariance is alpha I + (1 - alpha) (d/k) U U^T.
* sep-CMA-ES / CMA-ES: the mean update equals pycma's on pycma's own samples; evaluations to
  1e-8 on sphere, ellipsoid and Rosenbrock within 1.5x of pycma's (same-seed-independent
  medians); the diagonal learns the ellipsoid's scaling; sigma grows on a linear function.
* Every method: bitwise reproducible from its seed; state through torch.save / weights_only.
"""

from __future__ import annotations

import io
import math
import statistics

import numpy as np
import pytest
import torch

from resume_helpers import stop_and_resume

from blackbox_zo.config import ConfigError, EstimatorSettings, resolve_config
from blackbox_zo.estimators import RGE, make_estimator
from blackbox_zo.evolution import CMAES, ES, GuidedES, SepCMAES, centered_ranks, is_search, nes_utilities, \
    shape_losses
from blackbox_zo.oracle import Oracle, ParamSpace
from blackbox_zo.plan import PlanLosses, QueryPlan
from blackbox_zo.rundir import CHECKPOINT_NAME
from blackbox_zo.trainer import train
from problems.digits import DigitsProblem


class Linear(Oracle):
    name = "linear"

    def __init__(self, a):
        self.a = a
        self.space = ParamSpace([("x", (a.numel(),))])

    def losses(self, thetas, batch):
        return thetas @ self.a


class Function(Oracle):
    """f on rows of a float64 matrix, for the CMA benchmarks."""

    name = "function"

    def __init__(self, f, d):
        self.f, self.space = f, ParamSpace([("x", (d,))])

    def losses(self, thetas, batch):
        return self.f(thetas)


# ----------------------------------------------------------------------------- shaping


def test_centered_ranks_and_nes_utilities_by_hand():
    losses = torch.tensor([3.0, 1.0, 2.0, 5.0])
    # ranks 2, 0, 1, 3 of 4 -> rank / 3 - 1/2
    torch.testing.assert_close(centered_ranks(losses), torch.tensor([1 / 6, -1 / 2, -1 / 6, 1 / 2]))
    # Wierstra et al. 2014: u_i = max(0, ln(n/2 + 1) - ln i) / sum - 1/n, n = 4: ln 3, ln 3 - ln 2, 0, 0
    raw = torch.tensor([math.log(3), math.log(1.5), 0.0, 0.0], dtype=torch.float64)
    expected = raw / raw.sum() - 0.25
    torch.testing.assert_close(nes_utilities(4), expected)
    assert abs(float(nes_utilities(4).sum())) < 1e-15
    # shaped loss = -utility of its rank (best = smallest loss = rank 0 gets -u_1)
    torch.testing.assert_close(shape_losses(losses.double(), "nes"), -expected[[2, 0, 1, 3]])
    assert torch.equal(shape_losses(losses, "none"), losses)
    # invariant to an increasing transformation of the loss
    assert torch.equal(shape_losses(torch.exp(losses), "centered-ranks"), centered_ranks(losses))


def test_es_with_shaping_none_is_central_gaussian_rge(quadratic):
    theta = quadratic.initial_theta()
    es = ES(q=9, mu=1e-3, shaping="none", chunk=4).estimate(quadratic, theta, None, seed=5)
    rge = RGE(q=9, mu=1e-3, scheme="central", chunk=4).estimate(quadratic, theta, None, seed=5)
    torch.testing.assert_close(es.grad, rge.grad, rtol=1e-13, atol=1e-13)
    assert es.queries == rge.queries == 18


def test_es_expectation_on_a_linear_function():
    """f = a.x: (f(x + s e) - f(x - s e)) / 2s = a.e exactly, so E[g] = E[(a.e) e] = a, each coordinate with
    variance (|a|^2 + a_i^2) / q. Ranks: E[g] is parallel to a (by the symmetry of N(0, I))."""
    d, q = 6, 20000
    a = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    oracle, theta = Linear(a), torch.zeros(d, dtype=torch.float64)
    g = ES(q=q, mu=0.1, shaping="none").estimate(oracle, theta, None, seed=0).grad
    sd = torch.sqrt((a.norm() ** 2 + a**2) / q)
    assert bool(((g - a).abs() < 5 * sd).all()), (g, a)
    for shaping in ("centered-ranks", "nes"):
        g = ES(q=q, mu=0.1, shaping=shaping).estimate(oracle, theta, None, seed=1).grad
        cos = float(g @ a / (g.norm() * a.norm()))
        assert cos > 0.995, (shaping, cos)


def test_es_same_seed_same_estimate_and_state_free():
    oracle = Linear(torch.arange(5.0, dtype=torch.float64))
    theta = torch.ones(5, dtype=torch.float64)
    es = ES(q=3, mu=0.05)
    a, b = es.estimate(oracle, theta, None, seed=3), es.estimate(oracle, theta, None, seed=3)
    assert torch.equal(a.grad, b.grad) and a.queries == 6
    assert not torch.equal(a.grad, es.estimate(oracle, theta, None, seed=4).grad)


def test_es_on_a_coordinate_subset_leaves_the_rest_zero(quadratic):
    coords = torch.tensor([0, 3, 7])
    g = ES(q=4, mu=1e-2).estimate(quadratic, quadratic.initial_theta(), None, coords=coords, seed=0).grad
    rest = torch.ones(g.numel(), dtype=torch.bool)
    rest[coords] = False
    assert bool((g[rest] == 0).all()) and bool((g[coords] != 0).all())


# ----------------------------------------------------------------------------- Guided ES


def test_guided_es_sample_covariance():
    d, k, alpha = 8, 2, 0.3
    g = GuidedES(q=40000, mu=0.1, k=k, alpha=alpha)
    hist = torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g.load_state_dict({"history": hist})
    eps = g.directions_matrix(d, torch.Generator().manual_seed(1), torch.zeros(d, dtype=torch.float64))
    basis, _ = torch.linalg.qr(hist.T)
    expected = alpha * torch.eye(d, dtype=torch.float64) + (1 - alpha) * d / k * basis @ basis.T
    cov = eps.T @ eps / eps.shape[0]
    # entries of a sample covariance of 40,000 draws: sd <= sqrt(2) max(diag) / sqrt(n) ~ 0.03
    torch.testing.assert_close(cov, expected, rtol=0, atol=0.15)
    assert abs(float(torch.trace(cov)) / d - 1) < 0.03  # E|eps|^2 = d, as for N(0, I)


def test_guided_es_follows_its_history_and_checkpoints(quadratic):
    g = GuidedES(q=5, mu=1e-3, k=2, alpha=0.5)
    theta = quadratic.initial_theta()
    first = g.estimate(quadratic, theta, None, seed=0)
    assert g.state_dict()["history"].shape == (1, theta.numel())
    second = g.estimate(quadratic, theta, None, seed=1)
    third = g.estimate(quadratic, theta, None, seed=2)  # guided now: 2 estimates in the history
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    twin = GuidedES(q=5, mu=1e-3, k=2, alpha=0.5)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(g.estimate(quadratic, theta, None, seed=9).grad,
                       twin.estimate(quadratic, theta, None, seed=9).grad)
    # the guide helps on a quadratic: later estimates point closer to the true gradient than the first
    true = quadratic.grad(theta)

    def cos(v):
        return float(v @ true / (v.norm() * true.norm()))

    assert max(cos(second.grad), cos(third.grad)) > cos(first.grad) - 0.05


# ----------------------------------------------------------------------------- CMA-ES


def _run(search, f, x0, seed, max_evals, target=1e-8):
    """Evaluations until a sample below `target` (None when not reached), the search."""
    oracle, theta, evals, gen = Function(f, x0.numel()), x0.clone(), 0, 0
    while evals < max_evals:
        plan = search.plan(theta, seed=seed * 100_003 + gen)
        gen += 1
        values = oracle.losses(plan.points, None)
        evals += values.numel()
        if float(values.min()) < target:
            return evals, search
        theta = search.tell(plan, PlanLosses(plan, None, values, None, values.numel())).theta
    return None, search


def _pycma(diagonal, f, x0, seed, max_evals, target=1e-8):
    cma = pytest.importorskip("cma")
    es = cma.CMAEvolutionStrategy(x0.numpy(), 0.5, {"CMA_active": False, "CMA_diagonal": diagonal, "seed": seed + 1,
                                                    "verbose": -9, "tolfun": 0, "tolx": 0, "tolfunhist": 0})
    evals = 0
    while evals < max_evals:
        xs = es.ask()
        values = f(torch.tensor(np.array(xs)))
        evals += len(xs)
        if float(values.min()) < target:
            return evals, es
        es.tell(xs, values.tolist())
    return None, es


D = 10
SCALES = 1e6 ** (torch.arange(D, dtype=torch.float64) / (D - 1))
FUNCTIONS = {
    "sphere": lambda x: (x**2).sum(-1),
    "ellipsoid": lambda x: (SCALES * x**2).sum(-1),
    "rosenbrock": lambda x: (100 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2).sum(-1),
}


@pytest.mark.parametrize("name,cls,diagonal", [
    ("sphere", SepCMAES, True), ("ellipsoid", SepCMAES, True),
    ("sphere", CMAES, False), ("ellipsoid", CMAES, False), ("rosenbrock", CMAES, False),
])
def test_cma_reaches_the_target_in_as_many_evaluations_as_pycma(name, cls, diagonal):
    """Medians over 3 seeds of the evaluations to f < 1e-8 from x0 = 0.5 (Rosenbrock: 0), sigma0 = 0.5, d = 10.
    Measured (5 seeds): sphere sep 1,000 vs pycma 1,100, full 1,240 vs 1,250; ellipsoid sep 2,220 vs 2,790,
    full 5,550 vs 5,490; Rosenbrock full 6,200 vs 6,040. The seeds differ, so the runs differ: within 1.5x."""
    f = FUNCTIONS[name]
    x0 = torch.full((D,), 0.0 if name == "rosenbrock" else 0.5, dtype=torch.float64)
    ours = [_run(cls(sigma=0.5), f, x0, s, 20_000)[0] for s in range(3)]
    ref = [_pycma(diagonal, f, x0, s, 20_000)[0] for s in range(3)]
    assert None not in ours and None not in ref, (ours, ref)
    ratio = statistics.median(ours) / statistics.median(ref)
    assert 1 / 1.5 < ratio < 1.5, (ours, ref)


def test_sep_cma_learns_the_ellipsoid_scaling_like_pycma():
    """After 2,500 evaluations on the ellipsoid (coefficients 1 ... 1e6), the learned variances are ordered as
    1 / coefficient (log-variances correlate with -log coefficients: measured 0.997 for us, 0.999 for pycma)
    and span the same range (std of the log-variances: 4.6 and 4.7)."""
    f, x0 = FUNCTIONS["ellipsoid"], torch.full((D,), 0.5, dtype=torch.float64)
    _, ours = _run(SepCMAES(sigma=0.5), f, x0, 0, 2500, target=-1.0)
    _, ref = _pycma(True, f, x0, 0, 2500, target=-1.0)
    logc = -torch.log(SCALES)
    # pycma keeps a diagonal's scaling in sigma_vec ("diagonal decoding"), its variances stay near 1
    theirs = torch.tensor(ref.sigma_vec.scaling**2 * ref.sm.variances)
    for variances in (ours.state["diag_c"], theirs):
        v = torch.log(variances)
        corr = float(torch.corrcoef(torch.stack([v, logc]))[0, 1])
        assert corr > 0.98, corr
    spread = float(torch.log(ours.state["diag_c"]).std() / torch.log(theirs).std())
    assert 1 / 1.5 < spread < 1.5, spread


@pytest.mark.parametrize("cls", [SepCMAES, CMAES])
def test_mean_update_equals_pycma_on_pycma_samples(cls):
    """Fed pycma's own samples (C = I in the first generation, so z = (x - m) / sigma), the new mean is
    pycma's to rounding: both recombine the best mu with w_i ~ ln((lambda + 1)/2) - ln i."""
    cma = pytest.importorskip("cma")
    f = FUNCTIONS["ellipsoid"]
    es = cma.CMAEvolutionStrategy(np.ones(D), 0.5, {"CMA_active": False, "CMA_diagonal": cls is SepCMAES,
                                                    "seed": 4, "verbose": -9, "popsize": 10})
    ours, theta = cls(popsize=10, sigma=0.5), torch.ones(D, dtype=torch.float64)
    xs = torch.tensor(np.array(es.ask()))
    ours.plan(theta, seed=0)  # initialises the state
    y = (xs - theta) / 0.5
    plan = QueryPlan.at(xs)
    ours._pending = (plan, theta, y, y)  # C = I: z = y
    values = f(xs)
    es.tell(list(xs.numpy()), values.tolist())
    new = ours.tell(plan, PlanLosses(plan, None, values, None, 10)).theta
    torch.testing.assert_close(new, torch.tensor(es.mean), rtol=0, atol=1e-14)
    assert abs(ours.sigma / es.sigma - 1) < 0.05  # sigma: the same CSA rule, constants differ a little


@pytest.mark.parametrize("cls", [SepCMAES, CMAES])
def test_sigma_grows_on_a_linear_function_and_shrinks_on_the_sphere(cls):
    a = torch.linspace(-1, 1, D, dtype=torch.float64)
    _, lin = _run(cls(sigma=0.1), lambda x: x @ a, torch.zeros(D, dtype=torch.float64), 0, 600, target=-1e300)
    assert lin.sigma > 10 * 0.1  # cumulative step-size adaptation: the path is long, sigma grows exponentially
    _, sph = _run(cls(sigma=0.5), FUNCTIONS["sphere"], torch.full((D,), 0.5, dtype=torch.float64), 0, 600,
                  target=-1.0)
    assert sph.sigma < 0.5 / 10


@pytest.mark.parametrize("kind", ["sep-cma-es", "cma-es"])
def test_searches_are_registered_reproducible_and_checkpoint_safely(kind, quadratic):
    search = make_estimator(EstimatorSettings.model_validate({"kind": kind, "mu": 0.3, "popsize": 6}))
    assert is_search(search)
    theta = quadratic.initial_theta()
    for s in range(3):
        theta = search.step(quadratic, theta, None, seed=s).theta
    buf = io.BytesIO()
    torch.save(search.state_dict(), buf)
    buf.seek(0)
    twin = make_estimator(EstimatorSettings.model_validate({"kind": kind, "mu": 0.3, "popsize": 6}))
    twin.load_state_dict(torch.load(buf, weights_only=True))
    a, b = search.step(quadratic, theta, None, seed=7), twin.step(quadratic, theta, None, seed=7)
    assert torch.equal(a.theta, b.theta) and a.queries == b.queries == 6
    with pytest.raises(RuntimeError, match="last plan"):  # a tell for a plan it did not make
        plan = QueryPlan.at(theta.unsqueeze(0).repeat(6, 1))
        twin.tell(plan, PlanLosses(plan, None, torch.zeros(6, dtype=torch.float64), None, 6))
    with pytest.raises(ValueError, match="all coordinates"):
        twin.plan(theta, coords=torch.tensor([0, 1]), seed=0)


@pytest.mark.parametrize("kind", ["es", "guided-es", "sep-cma-es"])
def test_training_resumes_bitwise_mid_epoch(tmp_path, kind):
    """A digits run stopped after 7 steps and resumed ends bitwise where the uninterrupted run ends:
    the search's state (mean, sigma, paths, diagonal) and Guided ES's history ride in the checkpoint."""
    takes = {"es": ["estimator.q=4", "sparsity.enabled=false", "estimator.blocks=none", "phase2=none"], "guided-es": ["estimator.q=4", "estimator.guide_k=2"],
             "sep-cma-es": ["estimator.popsize=8"]}[kind]
    fast = ["model.width=2", "data.batch_size=64", f"estimator={kind}", *takes, "estimator.mu=0.05",
            "optimizer.name=adam",
            "optimizer.lr=0.01", "run.progress=false", "run.epochs=1", "run.checkpoint_every_steps=1"]

    def config(*extra):
        p = DigitsProblem()
        return p, resolve_config(p.config_model, p.default_config(), overrides=fast + list(extra))

    full, resumed, a, b = stop_and_resume(config, tmp_path, stop_at=7)
    assert full["steps"] == 22 and resumed["steps"] == 22  # 1,437 images, batches of 64
    if kind == "sep-cma-es":
        assert a["estimator"]["generation"] == 22 and a["estimator"]["sigma"] == b["estimator"]["sigma"]


def test_es_samples_in_the_zo_grasp_subspace_when_sparsity_is_on(tmp_path):
    """The hybrid: on digits ES takes the sparsity section like Sparse-CGE (ZO-GraSP at init, charged
    to `prune`), and every step moves only the coordinates of that step's set."""
    p = DigitsProblem()
    cfg = resolve_config(p.config_model, p.default_config(), overrides=[
        "model.width=2", "data.batch_size=64", "estimator=es", "estimator.blocks=none", "phase2=none",
        "estimator.q=3", "optimizer.name=sgd",
        "optimizer.momentum=0", "run.max_steps=1", "run.progress=false", "sparsity.q=4"])
    assert cfg.sparsity.enabled
    before = torch.cat([v.reshape(-1) for v in p.setup(cfg).module.state_dict().values()])
    summary = train(p, cfg, tmp_path)
    after = torch.cat([v.reshape(-1) for v in torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
                       ["module"].values()])
    moved = int((after != before).sum())
    assert summary["queries"]["prune"] > 0 and summary["queries"]["train"] == 6
    assert 0 < moved < 0.3 * before.numel()  # 90% sparsity on the weights; biases are always in the set
    dense = resolve_config(p.config_model, p.default_config(), overrides=["estimator=es", "sparsity.enabled=false"])
    assert dense.sparsity is None or not dense.sparsity.enabled


def test_es_blocks_move_only_those_blocks_and_resume_bitwise(tmp_path):
    """`estimator.blocks=["6"]`: ES samples in the digits CNN's last layer only (the sparsity set is not
    used), so after a few Adam steps every other parameter is exactly where it started and the last
    layer moved; a run stopped mid-way resumes bitwise."""
    fast = ["model.width=2", "data.batch_size=64", "estimator=es", 'estimator.blocks=["6"]', "phase2=none",
            "estimator.q=4",
            "estimator.mu=0.05", "optimizer.name=adam", "optimizer.lr=0.05", "run.progress=false", "run.epochs=1",
            "run.checkpoint_every_steps=1"]

    def config(*extra):
        p = DigitsProblem()
        return p, resolve_config(p.config_model, p.default_config(), overrides=fast + list(extra))

    p, cfg = config("run.max_steps=3")
    assert cfg.sparsity.enabled  # the default's sparsity section is there; blocks take precedence over it
    before = p.setup(cfg).module.state_dict()
    summary = train(p, cfg, tmp_path / "short")
    after = torch.load(tmp_path / "short" / CHECKPOINT_NAME, weights_only=True)["module"]
    assert summary["queries"]["train"] == 3 * 8
    for name in before:
        if name.startswith("6."):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    stop_and_resume(config, tmp_path, stop_at=7)


def test_es_blocks_naming_no_block_is_a_config_error(tmp_path):
    p = DigitsProblem()
    cfg = resolve_config(p.config_model, p.default_config(), overrides=[
        "model.width=2", "estimator=es", 'estimator.blocks=["7"]', "run.progress=false"])
    with pytest.raises(ConfigError, match=r"estimator.blocks: no parameter block '7' \(blocks: 0.weight"):
        train(p, cfg, tmp_path / "run")
    assert not any((tmp_path / "run").iterdir())  # nothing kept (the CLI also removes the directory it made)


def test_param_space_coords_of_selects_blocks_by_name_or_prefix():
    space = ParamSpace([("0.weight", (2, 3)), ("0.bias", (2,)), ("2.weight", (4,)), ("20.bias", (1,))])
    assert space.coords_of(["2"]).tolist() == [8, 9, 10, 11]  # "2" is not a prefix of "20.bias"
    assert space.coords_of(["0.bias", "2.weight"]).tolist() == [6, 7, 8, 9, 10, 11]
    assert space.coords_of(["20", "0"]).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]  # block order, each once
    with pytest.raises(ValueError, match="no parameter block '3'"):
        space.coords_of(["3"])
