"""Linear interpolation with sparse recovery (lecture 002) against closed forms and CGE."""

import math

import pytest
import torch

from blackbox_zo.config import ConfigError, TrainConfig, resolve_config
from blackbox_zo.estimators import CGE, LinearInterpolation, lasso_fista, make_estimator
from blackbox_zo.oracle import Oracle, ParamSpace


class SparseGradientQuadratic(Oracle):
    """f(theta) = g.(theta - t0) + 1/2 (theta - t0)^T A (theta - t0): grad f(t0) = g, exactly s-sparse.

    A is dense (rank 20), so away from t0 the gradient is dense: only the point t0 is sparse.
    """

    name = "sparse-quadratic"

    def __init__(self, d=1000, s=10, seed=0, curvature=True):
        gen = torch.Generator().manual_seed(seed)
        self.g = torch.zeros(d, dtype=torch.float64)
        self.support = torch.randperm(d, generator=gen)[:s]
        # Entries bounded away from 0 (|g_j| >= 0.5), the usual compressed-sensing test signal:
        # an entry far below lambda is invisible to any l1 method at that lambda.
        signs = torch.randint(0, 2, (s,), generator=gen).to(torch.float64) * 2 - 1
        self.g[self.support] = signs * (0.5 + torch.rand(s, generator=gen, dtype=torch.float64))
        low = torch.randn(d, 20, generator=gen, dtype=torch.float64)
        self.a = low @ low.T / 20 if curvature else torch.zeros(d, d, dtype=torch.float64)
        self.t0 = torch.randn(d, generator=gen, dtype=torch.float64)
        self.space = ParamSpace([("theta", (d,))])

    def losses(self, thetas, batch):
        z = thetas - self.t0
        return z @ self.g + 0.5 * ((z @ self.a) * z).sum(1)


def measurements(d=1000, s=10):
    # Compressed sensing: l1 recovery of an s-sparse vector from m >= C s log(d/s) random
    # measurements; C = 2 sits well inside the Donoho-Tanner success region for these sizes
    # (m/d = 0.093, s/m = 0.11), and m is 11x fewer queries than CGE's d + 1.
    return math.ceil(2 * s * math.log(d / s))


@pytest.mark.parametrize("directions", ["orthonormal", "dct", "rademacher"])
@pytest.mark.parametrize("curvature,scheme", [(True, "central"), (False, "forward")])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_an_exactly_sparse_gradient_from_few_queries(directions, curvature, scheme, seed):
    # Central differences are exact on a quadratic and forward differences on a linear function,
    # so b = Q g holds to float64 rounding; once LASSO finds the support, the least-squares refit
    # is exact up to cond(Q_S) * 1e-16 ~ 1e-14. 1e-9 leaves room and still fails on any wrong
    # support (a missed entry costs >= min |g_j| / ||g|| ~ 1e-2).
    oracle = SparseGradientQuadratic(seed=seed, curvature=curvature)
    m = measurements()
    li = LinearInterpolation(m=m, mu=1e-3, directions=directions, scheme=scheme, warm_start=False)
    est = li.estimate(oracle, oracle.t0, None, seed=seed)
    rel = float((est.grad - oracle.g).norm() / oracle.g.norm())
    assert rel < 1e-9, rel
    assert est.queries == (m + 1 if scheme == "forward" else 2 * m) < oracle.space.dim + 1
    assert oracle.ledger.total == est.queries


def test_without_the_l1_prior_m_much_less_than_d_cannot_recover():
    # The same measurements solved by the minimum-norm solution g = Q^T b (orthonormal rows)
    # recover only the projection of g on an m-dimensional subspace: E||Q^T Q g||^2 = (m/d) ||g||^2,
    # so the relative error is about sqrt(1 - m/d) = 0.95. This is what the LASSO buys.
    oracle = SparseGradientQuadratic(curvature=False)
    m = measurements()
    li = LinearInterpolation(m=m, directions="orthonormal")
    q = li.direction_matrix(m, oracle.space.dim, torch.Generator().manual_seed(0), oracle.t0)
    torch.testing.assert_close(q @ q.T, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-12)
    min_norm = q.T @ (q @ oracle.g)
    assert float((min_norm - oracle.g).norm() / oracle.g.norm()) > 0.8


def test_m_equals_d_with_q_identity_is_cge(quadratic):
    # Q = I: the perturbed points theta + mu e_j and the base point are the very ones CGE queries,
    # and Q^T b = b, so the estimates agree to the last bit (up to the one matmul with exact 0/1s).
    theta = quadratic.initial_theta()
    for scheme in ("forward", "central"):
        li = LinearInterpolation(m=None, mu=1e-3, directions="coordinate", scheme=scheme).estimate(quadratic, theta, None)
        cge = CGE(mu=1e-3, scheme=scheme).estimate(quadratic, theta, None)
        torch.testing.assert_close(li.grad, cge.grad, rtol=0, atol=1e-13)
        assert li.queries == cge.queries


@pytest.mark.parametrize("directions", ["orthonormal", "dct"])
def test_m_equals_d_with_orthonormal_q_equals_cge_on_a_quadratic(quadratic, directions):
    # A random orthonormal Q (Lemma 2's recommended choice): with central differences both
    # estimators are exact on a quadratic, so they agree to float64 rounding, amplified by
    # 1/mu: |f| * 1e-16 / 1e-3 * sqrt(d) ~ 1e-11; 1e-9 tolerance.
    theta = quadratic.initial_theta()
    li = LinearInterpolation(m=None, mu=1e-3, directions=directions, scheme="central")
    q = li.direction_matrix(theta.numel(), theta.numel(), torch.Generator().manual_seed(0), theta)
    torch.testing.assert_close(q.T @ q, torch.eye(theta.numel(), dtype=theta.dtype), rtol=0, atol=1e-12)
    cge = CGE(mu=1e-3, scheme="central").estimate(quadratic, theta, None)
    for seed in range(3):
        est = li.estimate(quadratic, theta, None, seed=seed)
        torch.testing.assert_close(est.grad, cge.grad, rtol=0, atol=1e-9)
        assert est.queries == cge.queries == 2 * theta.numel()


class LogCosh(Oracle):
    """sum log cosh(theta): L-smooth with L = 1, gradient tanh(theta)."""

    name = "logcosh"

    def __init__(self, d):
        self.space = ParamSpace([("theta", (d,))])

    def losses(self, thetas, batch):
        return torch.log(torch.cosh(thetas)).sum(1)


@pytest.mark.parametrize("directions", ["orthonormal", "dct", "gaussian"])
def test_lemma_2_error_bound_and_orthonormal_is_best(directions):
    # Lemma 2: ||g - grad f|| <= ||Q^{-1}|| sqrt(d) L mu / 2 (forward differences, L = 1 here).
    d, mu = 30, 1e-2
    oracle = LogCosh(d)
    theta = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    li = LinearInterpolation(m=None, mu=mu, directions=directions, scheme="forward")
    est = li.estimate(oracle, theta, None, seed=5)
    q = li.direction_matrix(d, d, torch.Generator().manual_seed(5), theta)
    inv_norm = float(torch.linalg.matrix_norm(torch.linalg.inv(q), ord=2))
    err = float((est.grad - torch.tanh(theta)).norm())
    assert err <= inv_norm * math.sqrt(d) * mu / 2
    if directions != "gaussian":
        assert abs(inv_norm - 1.0) < 1e-12  # the smallest ||Q^{-1}|| a unit-row Q can have
    else:
        assert inv_norm > 2.0  # random unit rows are badly conditioned: the bound is much looser


def test_fista_matches_the_lasso_optimality_conditions():
    # KKT of min 1/2||b - Qg||^2 + lam ||g||_1: r = Q^T (b - Q g) has r_j = lam sign(g_j) on the
    # support and |r_j| <= lam off it. FISTA stopped at relative change 1e-12 meets them to ~1e-8.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(40, 100, generator=gen, dtype=torch.float64) / math.sqrt(40)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    lam = 0.1 * float((q.T @ b).abs().max())
    g, iters = lasso_fista(q, b, lam, max_iters=100_000, tol=1e-12)
    r = q.T @ (b - q @ g)
    on = g != 0
    assert 0 < int(on.sum()) < 40 and iters < 100_000
    torch.testing.assert_close(r[on], lam * torch.sign(g[on]), rtol=0, atol=1e-7)
    assert float(r[~on].abs().max()) <= lam + 1e-7


def test_warm_start_saves_iterations_and_round_trips():
    # Two nearby steps: the second LASSO starts from the first solution and needs fewer iterations.
    oracle = SparseGradientQuadratic(curvature=False)
    m = measurements()
    warm = LinearInterpolation(m=m, mu=1e-3, warm_start=True, debias=False)
    cold = LinearInterpolation(m=m, mu=1e-3, warm_start=False, debias=False)
    warm.estimate(oracle, oracle.t0, None, seed=0)
    saved = warm.state_dict()
    warm.estimate(oracle, oracle.t0, None, seed=1)
    cold.estimate(oracle, oracle.t0, None, seed=1)
    assert warm.last_iterations < cold.last_iterations
    again = LinearInterpolation(m=m, mu=1e-3, warm_start=True, debias=False)
    again.load_state_dict(saved)
    e1 = again.estimate(oracle, oracle.t0, None, seed=1)
    warm.load_state_dict(saved)
    e2 = warm.estimate(oracle, oracle.t0, None, seed=1)
    assert torch.equal(e1.grad, e2.grad)


def test_coords_restrict_the_estimate(quadratic):
    theta = quadratic.initial_theta()
    coords = torch.tensor([1, 4, 7])
    est = LinearInterpolation(m=None, mu=1e-3, scheme="central").estimate(quadratic, theta, None, coords=coords)
    mask = torch.zeros(theta.numel(), dtype=torch.bool)
    mask[coords] = True
    assert torch.all(est.grad[~mask] == 0)
    torch.testing.assert_close(est.grad[mask], quadratic.grad(theta)[mask], rtol=0, atol=1e-9)
    assert est.queries == 6


def test_selectable_from_the_config():
    cfg = resolve_config(TrainConfig, {}, overrides=["estimator=linear-interpolation", "estimator.interp.m=50",
                                                     "estimator.interp.lam=0.1", "estimator.mu=1e-3"])
    est = make_estimator(cfg.estimator)
    assert isinstance(est, LinearInterpolation) and est.m == 50 and est.lam == 0.1 and est.mu == 1e-3
    with pytest.raises(ConfigError, match=r"estimator\.interp\.lam"):
        resolve_config(TrainConfig, {}, overrides=["estimator=linear-interpolation", "estimator.interp.lam=2"])
    with pytest.raises(ConfigError, match=r"estimator\.interp\.m"):
        resolve_config(TrainConfig, {}, overrides=["estimator.interp.m=0"])


def test_bad_arguments_fail_with_a_named_setting():
    with pytest.raises(ValueError, match="lam"):
        LinearInterpolation(lam=1.5)
    with pytest.raises(ValueError, match="directions"):
        LinearInterpolation(directions="sobol")
    with pytest.raises(ValueError, match="m must be"):
        LinearInterpolation(m=0)
