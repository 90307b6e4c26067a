import math

import pytest
import torch

from blackbox_zo.estimators import CGE, RGE
from blackbox_zo.oracle import Oracle, ParamSpace


def test_cge_central_is_exact_on_a_quadratic(quadratic):
    # The central difference of a quadratic has no truncation error: only float64 rounding
    # (~1e-16 * |f| / mu ~ 1e-13) remains.
    theta = quadratic.initial_theta()
    est = CGE(mu=1e-3, scheme="central").estimate(quadratic, theta, None)
    torch.testing.assert_close(est.grad, quadratic.grad(theta), rtol=0, atol=1e-9)


class LogCoshQuadratic(Oracle):
    """f = sum log cosh(theta) + 1/2 theta^T A theta: L-smooth with L = 1 + lambda_max(A)."""

    name = "logcosh"

    def __init__(self, a):
        self.a = a
        self.space = ParamSpace([("theta", (a.shape[0],))])

    def losses(self, thetas, batch):
        return torch.log(torch.cosh(thetas)).sum(1) + 0.5 * torch.einsum("pi,ij,pj->p", thetas, self.a, thetas)

    def grad(self, theta):
        return torch.tanh(theta) + self.a @ theta


@pytest.mark.parametrize("mu", [1e-1, 1e-2, 1e-3])
def test_cge_forward_error_within_lecture_bound(mu):
    gen = torch.Generator().manual_seed(1)
    d = 20
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = m @ m.T / d
    oracle = LogCoshQuadratic(a)
    theta = torch.randn(d, generator=gen, dtype=torch.float64)
    est = CGE(mu=mu, scheme="forward").estimate(oracle, theta, None)
    lipschitz = 1.0 + float(torch.linalg.eigvalsh(a).max())
    err = float((est.grad - oracle.grad(theta)).norm())
    assert err <= math.sqrt(d) * lipschitz * mu / 2  # lecture 002: ||g_hat - g|| <= sqrt(d) L mu / 2
    assert err > 0.01 * math.sqrt(d) * mu  # a forward difference really has O(mu) bias: the bound is not vacuous


@pytest.mark.parametrize("distribution,per_coord_var", [("gaussian", 2.0), ("sphere", 3.0)])
def test_rge_is_unbiased_on_a_quadratic(quadratic, distribution, per_coord_var):
    # For a quadratic both scalings are exactly unbiased (odd moments of u vanish).
    # One direction's estimate has per-coordinate variance <= c ||g||^2 (c = 2 Gaussian,
    # c = 3 d/(d+2) sphere), so the mean of M directions has E||err||^2 <= c d ||g||^2 / M;
    # 5 sigma of that is the tolerance. A wrong scaling (factor d = 12 or 1/d) fails by far.
    theta = quadratic.initial_theta()
    g = quadratic.grad(theta)
    q, seeds = 200, 100
    rge = RGE(q=q, mu=1e-3, distribution=distribution)
    mean = sum(rge.estimate(quadratic, theta, None, seed=s).grad for s in range(seeds)) / seeds
    m_dirs = q * seeds
    tol = 5 * math.sqrt(per_coord_var * quadratic.space.dim / m_dirs) * float(g.norm())
    assert float((mean - g).norm()) < tol
    assert tol < 0.5 * float(g.norm())


def test_rge_same_seed_same_directions_and_central_queries(quadratic):
    theta = quadratic.initial_theta()
    rge = RGE(q=10, mu=1e-3, scheme="central", chunk=3)
    a = rge.estimate(quadratic, theta, None, seed=7)
    b = rge.estimate(quadratic, theta, None, seed=7)
    c = rge.estimate(quadratic, theta, None, seed=8)
    assert torch.equal(a.grad, b.grad) and not torch.equal(a.grad, c.grad)
    assert a.queries == 20


def test_query_counts_and_subsets_match_the_ledger(quadratic):
    theta = quadratic.initial_theta()
    coords = torch.tensor([0, 3, 5])
    cases = [
        (CGE(scheme="forward"), coords, 3 + 1),
        (CGE(scheme="central"), coords, 2 * 3),
        (CGE(scheme="forward"), None, quadratic.space.dim + 1),
        (RGE(q=9, scheme="forward"), None, 9 + 1),
        (RGE(q=9, scheme="central"), coords, 18),
    ]
    for est, cs, expected in cases:
        before_ledger, before_rows = quadratic.ledger.total, quadratic.rows_evaluated
        out = est.estimate(quadratic, theta, None, coords=cs, seed=0)
        assert out.queries == expected
        assert quadratic.ledger.total - before_ledger == expected
        assert quadratic.rows_evaluated - before_rows == expected
        if cs is not None:
            outside = torch.ones(quadratic.space.dim, dtype=torch.bool)
            outside[cs] = False
            assert torch.all(out.grad[outside] == 0)
            assert torch.all(out.grad[cs] != 0)


def test_bad_estimator_settings_raise():
    with pytest.raises(ValueError, match="mu"):
        CGE(mu=0)
    with pytest.raises(ValueError, match="q"):
        RGE(q=0)
    with pytest.raises(ValueError, match="distribution"):
        RGE(distribution="cauchy")
