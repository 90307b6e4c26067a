"""Gradient estimators: CGE, RGE (DeepZero eq. (1); lecture 002) and linear interpolation.

Every estimator has one shape::

    estimator.estimate(oracle, theta, batch, coords=None, seed=None, *, sharder=None) -> Estimate

and is built from two steps on the engine's one primitive, the query plan
(blackbox_zo/plan.py): `plan(theta, ...)` says which points to evaluate (coordinates or
directions around theta) and `combine(plan, losses)` turns their loss values into the
estimate. `estimate` runs the plan through `blackbox_zo.plan.execute`, which queries the
oracle through the ledger (so `Estimate.queries` is the exact count of the call) and, given a
`parallel.PlanSharder` under torchrun, evaluates only this rank's share: every estimator runs
in parallel without a line of its own for it. `coords` restricts the estimate to a subset of
coordinates (how gradient sparsity arrives); coordinates outside it get zero.

Estimators are registered by name (`ESTIMATORS`, entry-point group `blackbox_zo.estimators`);
the config's `estimator.kind` resolves through it (`make_estimator`). A registered estimator
names the model of its settings (`config_model`, a subclass of
`blackbox_zo.config.EstimatorConfig`; the default has `mu` and `scheme` only) and builds itself
from them (`from_config`). The finite-difference step is called `mu` everywhere.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .config import CGEConfig, EstimatorConfig, LinearInterpolationConfig, RGEConfig
from .oracle import Oracle
from .parallel import PlanSharder
from .plan import ExplicitDirections, PlanLosses, QueryPlan, SeededDirections, execute
from .registry import ESTIMATORS

__all__ = [
    "Estimate",
    "Estimator",
    "PlanEstimator",
    "scatter_coords",
    "CGE",
    "RGE",
    "LinearInterpolation",
    "lasso_fista",
    "ESTIMATORS",
    "register_estimator",
    "available_estimators",
    "make_estimator",
]

register_estimator = ESTIMATORS.register


def available_estimators() -> dict[str, Any]:
    """{name: estimator class}, the engine's own and plug-ins', sorted by name."""
    return ESTIMATORS.available()


def make_estimator(cfg: Any) -> "PlanEstimator":
    """The one dispatcher: an `EstimatorConfig` -> the estimator its `kind` names in the registry."""
    return ESTIMATORS.get(cfg.kind).from_config(cfg)


@dataclass
class Estimate:
    grad: Tensor  # [d]
    queries: int  # loss values requested by this estimate (the job's count under torchrun)
    base_loss: float  # loss at theta (for central schemes: mean of the +/- pairs, O(mu^2) accurate)


class Estimator(Protocol):
    def estimate(self, oracle: Oracle, theta: Tensor, batch: Any, coords: Tensor | None = None,
                 seed: int | None = None, *, sharder: PlanSharder | None = None) -> Estimate: ...


def _check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return float(mu)


def _check_scheme(scheme: str) -> str:
    if scheme not in ("forward", "central"):
        raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
    return scheme


def _draw_seed(seed: int | None) -> int:
    return int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)


class PlanEstimator(ABC):
    """An estimator as a plan builder and a combine step; `estimate` runs the plan in between.

    `plan` and `combine` never query; `estimate` is the only place the plan meets an oracle
    (through `execute`). `chunk` (None: the oracle's `chunk_size`) is how many directions are
    drawn and evaluated at a time; it changes no direction (`SeededDirections`).
    """

    chunk: int | None = None
    config_model: type[EstimatorConfig] = EstimatorConfig  # the `estimator` settings of this kind

    @abstractmethod
    def plan(self, theta: Tensor, *, coords: Tensor | None = None, seed: int | None = None,
             chunk: int = 256) -> QueryPlan:
        """The points this estimate needs around theta (no queries)."""

    @abstractmethod
    def combine(self, plan: QueryPlan, losses: PlanLosses) -> Estimate:
        """The estimate from the plan's losses (no queries)."""

    @classmethod
    def from_config(cls, cfg: Any) -> "PlanEstimator":
        raise NotImplementedError(f"{cls.__name__} has no from_config({cls.config_model.__name__})")

    def step_plan(self, oracle: Oracle, theta: Tensor, batch: Any, *, coords: Tensor | None = None,
                  seed: int | None = None, chunk: int | None = None) -> QueryPlan:
        """The plan of one step on `batch` (no queries). Most plans depend on theta and the seed only; an
        estimator whose directions come from the batch as the oracle sees it (subspace-cge: a layer's inputs)
        overrides this."""
        return self.plan(theta, coords=coords, seed=seed, chunk=chunk or self.chunk or max(1, oracle.chunk_size(theta)))

    def estimate(self, oracle: Oracle, theta: Tensor, batch: Any, coords: Tensor | None = None,
                 seed: int | None = None, *, sharder: PlanSharder | None = None) -> Estimate:
        plan = self.step_plan(oracle, theta, batch, coords=coords, seed=seed)
        return self.combine(plan, execute(plan, oracle, batch, sharder=sharder))


def scatter_coords(theta: Tensor, coords: Tensor | None, values: Tensor) -> Tensor:
    """A [d] vector with `values` at `coords` (everywhere when None) and zeros elsewhere."""
    grad = torch.zeros_like(theta)
    if coords is None:
        grad += values
    else:
        grad[coords] = values
    return grad


@register_estimator("cge")
class CGE(PlanEstimator):
    """Coordinate-wise gradient estimate (DeepZero eq. (1), CGE; Sparse-CGE with `coords`).

    forward: g_j = (l(theta + mu e_j) - l(theta)) / mu      |S| + 1 queries, error <= L mu / 2 per coordinate
    central: g_j = (l(theta + mu e_j) - l(theta - mu e_j)) / (2 mu)   2 |S| queries, error O(mu^2)
    """

    config_model = CGEConfig

    def __init__(self, mu: float = 5e-3, scheme: Literal["forward", "central"] = "forward"):
        self.mu = _check_mu(mu)
        self.scheme = _check_scheme(scheme)

    @classmethod
    def from_config(cls, cfg: Any) -> "CGE":
        return cls(mu=cfg.mu, scheme=cfg.scheme)

    def __repr__(self) -> str:
        return f"CGE(mu={self.mu}, scheme={self.scheme!r})"

    def plan(self, theta, *, coords=None, seed=None, chunk=256) -> QueryPlan:
        return QueryPlan.coordinates(theta, self.mu, coords, self.scheme, label="CGE estimate")

    def combine(self, plan, losses) -> Estimate:
        grad = torch.zeros_like(plan.theta)
        grad[plan.coord_indices()] = losses.differences()
        return Estimate(grad, losses.queries, losses.base_loss())


@register_estimator("rge")
class RGE(PlanEstimator):
    """Randomized gradient estimate with q directions (DeepZero eq. (1), RGE; lecture 002).

    gaussian: u ~ N(0, I),            g = (1/q) sum_i [(l(theta + mu u_i) - l(theta)) / mu] u_i
    sphere:   u ~ Unif(unit sphere),  g = (d/q) sum_i [(l(theta + mu u_i) - l(theta)) / mu] u_i
    (central: the difference becomes (l(theta + mu u) - l(theta - mu u)) / (2 mu).)

    Both are unbiased for the gradient of the mu-smoothed loss. Directions come from a
    `SeededDirections` plan: direction i depends only on (seed, i, d, dtype), whatever the
    chunk they are drawn in, and memory is O(chunk * d), never O(q * d). With
    `coords`, directions live in the span of those coordinates and d becomes |coords|.
    """

    config_model = RGEConfig

    def __init__(
        self,
        q: int = 192,
        mu: float = 5e-3,
        distribution: Literal["gaussian", "sphere"] = "gaussian",
        scheme: Literal["forward", "central"] = "forward",
        chunk: int | None = None,
    ):
        if q < 1:
            raise ValueError(f"q must be >= 1, got {q}")
        if distribution not in ("gaussian", "sphere"):
            raise ValueError(f"distribution must be 'gaussian' or 'sphere', got {distribution!r}")
        self.q, self.mu, self.distribution, self.scheme, self.chunk = int(q), _check_mu(mu), distribution, _check_scheme(scheme), chunk

    @classmethod
    def from_config(cls, cfg: Any) -> "RGE":
        return cls(q=cfg.q, mu=cfg.mu, distribution=cfg.distribution, scheme=cfg.scheme)

    def __repr__(self) -> str:
        return f"RGE(q={self.q}, mu={self.mu}, distribution={self.distribution!r}, scheme={self.scheme!r})"

    def plan(self, theta, *, coords=None, seed=None, chunk=256) -> QueryPlan:
        k = theta.numel() if coords is None else coords.numel()
        directions = SeededDirections(self.q, k, _draw_seed(seed), int(self.chunk or chunk), self.distribution)
        return QueryPlan.along(theta, directions, self.mu, self.scheme, coords, label="RGE estimate")

    def combine(self, plan, losses) -> Estimate:
        k = plan.directions.dim
        scale = (k if self.distribution == "sphere" else 1.0) / self.q
        acc = losses.directions_sum(losses.differences())
        return Estimate(scatter_coords(plan.theta, plan.coords, acc * scale), losses.queries, losses.base_loss())


# ---------------------------------------------------------------- linear interpolation


def lasso_fista(
    q: Tensor,
    b: Tensor,
    lam: float,
    x0: Tensor | None = None,
    *,
    lipschitz: float | None = None,
    max_iters: int = 500,
    tol: float = 1e-6,
) -> tuple[Tensor, int]:
    """min_g 1/2 ||b - Q g||^2 + lam ||g||_1 by FISTA (Beck & Teboulle 2009); returns (g, iterations).

    Step 1/L with L = ||Q||_2^2 (the Lipschitz constant of the smooth part's gradient);
    stops when the relative change of the iterate drops below `tol`.
    """
    if lipschitz is None:
        gram = q @ q.T if q.shape[0] <= q.shape[1] else q.T @ q  # the smaller Gram matrix
        lipschitz = float(torch.linalg.eigvalsh(gram)[-1])
    step = 1.0 / max(lipschitz, 1e-30)
    x = torch.zeros(q.shape[1], dtype=q.dtype, device=q.device) if x0 is None else x0.clone()
    y, t = x.clone(), 1.0
    for it in range(1, max_iters + 1):
        z = y - step * (q.T @ (q @ y - b))
        x_new = torch.sign(z) * torch.clamp(z.abs() - step * lam, min=0.0)  # soft threshold: prox of lam ||.||_1
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        change = float((x_new - x).norm())
        x, t = x_new, t_new
        if change <= tol * max(float(x.norm()), 1e-30):
            return x, it
    return x, max_iters


@register_estimator("linear-interpolation")
class LinearInterpolation(PlanEstimator):
    """Gradient by linear interpolation with sparse recovery (lecture 002: linear interpolation, Lemma 2, LASSO).

    With m directions u_1..u_m (the rows of Q) and b_i = (l(theta + mu u_i) - l(theta)) / mu
    (central: (l(theta + mu u_i) - l(theta - mu u_i)) / (2 mu)), Taylor's formula gives
    Q g ~= b (lecture 002, "linear interpolation").

    * m = k (k = d, or |coords|): Q is square and the system is solved exactly. Lemma 2,
      ||g - grad l|| <= ||Q^{-1}|| sqrt(d) L mu / 2, says an orthonormal Q is the best choice:
      the default `directions="orthonormal"` draws a Haar-random orthogonal Q and g = Q^T b.
      `directions="coordinate"` (Q = I) is exactly forward/central CGE. The Haar draw costs a QR
      factorisation, O(k m^2) (seconds per step at k = m = 4000 on one core); `directions="dct"`
      is also orthonormal, a randomised DCT-II (random signs, random rows), built in O(k m).
    * m < k: the sparse-recovery problem of the lecture (the ZORO line of work, Cai et al. 2022),
      ``min_g 1/2 ||b - Q g||^2 + lambda ||g||_1``, solved by FISTA in torch and warm-started from
      the previous call's solution (the gradient moves little between steps). `lam` is relative:
      lambda = lam * ||Q^T b||_inf, the fraction of the smallest lambda whose solution is 0, so
      the setting does not depend on the loss scale. `debias` refits the recovered support by least
      squares (standard in compressed sensing) when the support has at most m/2 entries; it removes
      the l1 shrinkage bias, and is skipped for dense supports where the refit would be ill-posed.

    Rows of Q are unit vectors for every `directions` choice, so the perturbation mu u_i has the
    same size as CGE's step and the finite-difference bias is comparable.
    Queries: m + 1 (forward) or 2 m (central): a plan of explicit directions (the rows of Q).
    """

    config_model = LinearInterpolationConfig
    DIRECTIONS = ("orthonormal", "dct", "rademacher", "gaussian", "coordinate")
    ORTHONORMAL = ("orthonormal", "dct", "coordinate")  # rows orthonormal: Q^{-1} = Q^T when m = k, ||Q||_2 = 1

    def __init__(
        self,
        m: int | None = None,
        mu: float = 5e-3,
        directions: Literal["orthonormal", "dct", "rademacher", "gaussian", "coordinate"] = "orthonormal",
        scheme: Literal["forward", "central"] = "forward",
        lam: float = 0.02,
        max_iters: int = 1000,
        tol: float = 1e-6,
        warm_start: bool = True,
        debias: bool = True,
        chunk: int | None = None,
    ):
        if m is not None and m < 1:
            raise ValueError(f"m must be >= 1 (or None for m = d), got {m}")
        if directions not in self.DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(self.DIRECTIONS)}, got {directions!r}")
        _check_scheme(scheme)
        if not 0 <= lam < 1:
            raise ValueError(f"lam must be in [0, 1) (a fraction of lambda_max = ||Q^T b||_inf), got {lam}")
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.m = None if m is None else int(m)
        self.mu = _check_mu(mu)
        self.directions, self.scheme, self.lam = directions, scheme, float(lam)
        self.max_iters, self.tol, self.warm_start, self.debias, self.chunk = int(max_iters), float(tol), warm_start, debias, chunk
        self._previous: Tensor | None = None  # last solution, in the coordinates' space (warm start)
        self.last_iterations = 0  # FISTA iterations of the last call (0 for the exact solve)

    @classmethod
    def from_config(cls, cfg: Any) -> "LinearInterpolation":
        i = cfg.interp
        return cls(m=i.m, mu=cfg.mu, directions=i.directions, scheme=cfg.scheme, lam=i.lam, max_iters=i.max_iters,
                   tol=i.tol, warm_start=i.warm_start, debias=i.debias)

    def __repr__(self) -> str:
        return (f"LinearInterpolation(m={self.m}, mu={self.mu}, directions={self.directions!r}, "
                f"scheme={self.scheme!r}, lam={self.lam})")

    # -- warm-start state (saved in checkpoints so a resumed run continues bitwise) --------

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self._previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")

    def reset(self) -> None:
        self._previous = None

    # -- directions -------------------------------------------------------------------

    def direction_matrix(self, m: int, k: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """Q [m, k] with unit rows; orthonormal rows for 'orthonormal' (Haar: QR with sign fix) and 'dct'."""
        if self.directions == "coordinate":
            if m != k:
                raise ValueError("directions='coordinate' needs m = d (it is CGE); use another kind for m < d")
            return torch.eye(k, dtype=like.dtype, device=like.device)
        if self.directions == "orthonormal":
            z = torch.randn(k, m, generator=generator, dtype=torch.float64)
            basis, r = torch.linalg.qr(z)  # [k, m], orthonormal columns
            basis = basis * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix -> Haar distribution
            return basis.T.to(dtype=like.dtype, device=like.device).contiguous()
        if self.directions == "dct":
            # Rows of the orthonormal DCT-II matrix C[i, j] = c_i cos(pi (j + 1/2) i / k), at m distinct
            # random frequencies, times random column signs: orthonormal rows, entries O(1/sqrt(k)).
            freq = torch.randperm(k, generator=generator)[:m].to(torch.float64)
            signs = torch.randint(0, 2, (k,), generator=generator).to(torch.float64) * 2 - 1
            j = torch.arange(k, dtype=torch.float64) + 0.5
            rows = torch.cos(torch.outer(freq, j) * (math.pi / k)) * math.sqrt(2.0 / k)
            rows[freq == 0] = math.sqrt(1.0 / k)
            return (rows * signs).to(dtype=like.dtype, device=like.device)
        if self.directions == "rademacher":
            u = torch.randint(0, 2, (m, k), generator=generator, dtype=torch.int8).to(like.dtype) * 2 - 1
            return (u / math.sqrt(k)).to(like.device)
        u = torch.randn(m, k, generator=generator, dtype=like.dtype)
        return (u / u.norm(dim=1, keepdim=True)).to(like.device)

    # -- the estimate -----------------------------------------------------------------

    def plan(self, theta, *, coords=None, seed=None, chunk=256) -> QueryPlan:
        gen = torch.Generator().manual_seed(_draw_seed(seed))
        k = theta.numel() if coords is None else coords.numel()
        m = k if self.m is None else min(self.m, k)  # more than k directions carry no information
        q = self.direction_matrix(m, k, gen, theta)
        return QueryPlan.along(theta, ExplicitDirections(q, int(self.chunk or chunk)), self.mu, self.scheme, coords,
                               label="linear-interpolation estimate")

    def combine(self, plan, losses) -> Estimate:
        q = plan.directions.matrix
        g = self._solve(q, losses.differences().to(plan.theta.dtype), q.shape[1])
        return Estimate(scatter_coords(plan.theta, plan.coords, g), losses.queries, losses.base_loss())

    def _solve(self, q: Tensor, b: Tensor, k: int) -> Tensor:
        m = q.shape[0]
        if m == k:  # square system: exact solve (Lemma 2)
            self.last_iterations = 0
            if self.directions in self.ORTHONORMAL:
                return q.T @ b  # Q^{-1} = Q^T
            return torch.linalg.solve(q, b)
        lam = self.lam * float((q.T @ b).abs().max())
        x0 = self._previous if (self.warm_start and self._previous is not None and self._previous.numel() == k) else None
        lipschitz = 1.0 if self.directions in self.ORTHONORMAL else None  # orthonormal rows: ||Q||_2 = 1
        g, self.last_iterations = lasso_fista(q, b, lam, x0, lipschitz=lipschitz, max_iters=self.max_iters, tol=self.tol)
        if self.debias:
            support = torch.nonzero(g).squeeze(1)
            if 0 < support.numel() <= m // 2:
                g = torch.zeros_like(g).index_copy_(0, support, torch.linalg.lstsq(q[:, support], b.unsqueeze(1)).solution.squeeze(1))
        if self.warm_start:
            self._previous = g.detach().clone()
        return g
