"""Evolution strategies through the engine's query plans: ES, Guided ES, sep-CMA-ES, CMA-ES.

Two shapes, one primitive (the query plan, blackbox_zo/plan.py):

* **Gradient estimators** (`PlanEstimator`): the estimate goes into `p.grad` and any
  `torch.optim` optimizer steps.

  - `ES` ("es"): OpenAI-style natural-evolution strategy (Salimans et al., "Evolution
    Strategies as a Scalable Alternative to Reinforcement Learning", arXiv:1703.03864):
    q antithetic pairs theta +/- sigma eps_k, eps_k ~ N(0, I) (a seeded direction plan with
    the central scheme, sigma = `mu`), the 2q losses replaced by shaped values s = shape(l),
    and

        g = (1 / q) sum_k (s+_k - s-_k) / (2 sigma) eps_k.

    Shaping "none" leaves the losses as they are: g is then exactly central Gaussian RGE, an
    unbiased estimate of the gradient of the sigma-smoothed loss. "centered-ranks" (the
    OpenAI code) replaces each loss by its rank among the 2q, scaled to [-0.5, 0.5];
    "nes" by minus the NES utility of its rank (Wierstra et al., "Natural Evolution
    Strategies", JMLR 2014, arXiv:1106.4487, Sec. 3.1):
    u_i = max(0, ln(lambda/2 + 1) - ln i) / sum_j max(0, ln(lambda/2 + 1) - ln j) - 1/lambda
    for the i-th best of lambda = 2q. Shaped estimates are invariant to any increasing
    transformation of the loss (outliers, loss scale); their scale is arbitrary, which
    Adam does not mind.

  - `GuidedES` ("guided-es"): Guided ES (Maheswaranathan et al., "Guided evolutionary
    strategies: augmenting random search with surrogate gradients", ICML 2019,
    arXiv:1806.10230, Algorithm 1): the search distribution is
    N(0, sigma^2 Sigma), Sigma = (alpha / d) I + ((1 - alpha) / k) U U^T, where U is an
    orthonormal basis of the last k gradient estimates (here: this method's own earlier
    estimates, so it needs no surrogate), and g = beta / (2 sigma^2 q) sum_k eps_k
    (s+_k - s-_k) (eq. 3 with beta = 2 applied to the shaped values; the scale is
    arbitrary under Adam). The first k steps have no guide (alpha = 1). Its state (the
    guiding estimates) is checkpointed.

* **Searches** (`Search`): a distribution-adapting method proposes the next theta itself;
  the trainer loads the proposal (the mean of the search distribution) into the
  parameters and takes no optimizer step. `plan(theta, seed=...)` samples the population
  around theta (= the mean), `tell(plan, losses)` updates the state and returns the new
  mean.

  - `SepCMAES` ("sep-cma-es"): CMA-ES with a diagonal covariance (Ros & Hansen, "A Simple
    Modification in CMA-ES Achieving Linear Time and Space Complexity", PPSN 2008): O(d)
    per sample, the learning rates c_1 and c_mu multiplied by (d + 2) / 3.
  - `CMAES` ("cma-es"): the full covariance, for small d (O(d^2) memory, an
    eigendecomposition per generation).

  Both follow the update equations of Hansen, "The CMA Evolution Strategy: A Tutorial"
  (arXiv:1604.00772), with positive recombination weights (Table 1 and eqs. (39)-(47)),
  written on tensors so that their state checkpoints as plain tensors and floats
  (`torch.load(..., weights_only=True)`); tests compare them with pycma on benchmark
  functions.

Every method draws its samples from a generator seeded by the step's seed: a run is
reproducible bitwise from its seed, and a plan can be rebuilt in another process (ask/tell)
or on another rank (torchrun) from the same state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from .config import EstimatorSettings
from .estimators import Estimate, PlanEstimator, register_estimator, scatter_coords
from .parallel import PlanSharder
from .plan import ExplicitDirections, PlanLosses, QueryPlan, SeededDirections, execute

__all__ = [
    "ESConfig",
    "GuidedESConfig",
    "CMAConfig",
    "SepCMAConfig",
    "SHAPINGS",
    "shape_losses",
    "centered_ranks",
    "nes_utilities",
    "ES",
    "GuidedES",
    "Search",
    "SearchStep",
    "SepCMAES",
    "CMAES",
    "is_search",
]

Shaping = Literal["centered-ranks", "nes", "none"]
SHAPINGS = ("centered-ranks", "nes", "none")


# ----------------------------------------------------------------------- small helpers


def _check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"mu (sigma) must be > 0, got {mu}")
    return float(mu)


def _draw_seed(seed: int | None) -> int:
    """The step's seed, or a fresh one from torch's generator (as the estimators of estimators.py)."""
    return int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)


# ----------------------------------------------------------------------- fitness shaping


def _ranks(losses: Tensor) -> Tensor:
    """0 for the smallest loss ... n - 1 for the largest (ties broken by position, stably)."""
    order = torch.argsort(losses, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(losses.numel(), device=losses.device)
    return ranks


def centered_ranks(losses: Tensor) -> Tensor:
    """rank / (n - 1) - 0.5, in [-0.5, 0.5]: the OpenAI ES shaping (the largest loss gets +0.5)."""
    n = losses.numel()
    if n < 2:
        return torch.zeros_like(losses)
    return _ranks(losses).to(losses.dtype) / (n - 1) - 0.5


def nes_utilities(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The NES utilities u_1 >= ... >= u_n of the best ... worst of n samples (Wierstra et al. 2014, Sec. 3.1)."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    raw = torch.clamp(math.log(n / 2 + 1) - torch.log(i), min=0.0)
    return (raw / raw.sum() - 1.0 / n).to(dtype)


def shape_losses(losses: Tensor, shaping: str) -> Tensor:
    """Losses -> shaped values that replace them in the estimate (larger loss, larger value)."""
    if shaping == "none":
        return losses
    if shaping == "centered-ranks":
        return centered_ranks(losses)
    if shaping == "nes":
        return -nes_utilities(losses.numel(), losses.dtype).to(losses.device)[_ranks(losses)]
    raise ValueError(f"shaping must be one of {', '.join(SHAPINGS)}, got {shaping!r}")


def _check_shaping(shaping: str) -> str:
    if shaping not in SHAPINGS:
        raise ValueError(f"shaping must be one of {', '.join(SHAPINGS)}, got {shaping!r}")
    return shaping


def _shaped_differences(losses: PlanLosses, shaping: str) -> Tensor:
    """(s+_k - s-_k) / (2 sigma) for the antithetic pairs, after shaping all 2q losses together."""
    q = losses.plus.numel()
    shaped = shape_losses(torch.cat([losses.plus, losses.minus]), shaping)
    return (shaped[:q] - shaped[q:]) / (2 * losses.plan.mu)


# ------------------------------------------------------------------------------ settings


class ESConfig(EstimatorSettings):
    """kind=es: q antithetic Gaussian pairs (2q queries a step), sigma = mu, fitness shaping."""

    uses_sparsity: ClassVar[bool] = True  # samples in the step's coordinate subset when sparsity is on
    kind: Literal["es"] = Field("es", description="OpenAI-style evolution strategy (antithetic, rank-shaped)")
    mu: float = Field(0.02, gt=0, description="finite-difference step, for every estimator; here sigma, the scale of "
                      "the Gaussian perturbations")
    q: int = Field(16, ge=1, description="random directions per step; here antithetic pairs (2q queries)")
    shaping: Literal["centered-ranks", "nes", "none"] = Field(
        "centered-ranks", description="losses -> ranks in [-0.5, 0.5], minus NES utilities, or raw losses "
        "(none: central Gaussian RGE)")
    blocks: Optional[list[str]] = Field(
        None, min_length=1, description="sample only in these parameter blocks, each a name or the prefix of "
        "names (e.g. [\"6\"]: a Sequential's layer 6, weight and bias); the sparsity set is then not used "
        "(none: every coordinate, or the step's sparsity set)")


class GuidedESConfig(ESConfig):
    """kind=guided-es: ES whose samples lean towards the span of its last k estimates."""

    uses_sparsity: ClassVar[bool] = False  # its guiding subspace lives in one fixed coordinate space
    kind: Literal["guided-es"] = Field("guided-es", description="Guided ES (Maheswaranathan et al. 2019)")
    guide_k: int = Field(1, ge=1, le=64, description="the last k estimates span the guiding subspace")
    guide_alpha: float = Field(0.5, gt=0, le=1, description="weight of the isotropic part (1: plain ES)")


class SepCMAConfig(EstimatorSettings):
    """kind=sep-cma-es: a distribution-adapting search (diagonal covariance) that moves theta itself."""

    kind: Literal["sep-cma-es"] = Field("sep-cma-es", description="CMA-ES with a diagonal covariance (O(d))")
    mu: float = Field(0.02, gt=0, description="finite-difference step, for every estimator; here sigma_0, the "
                      "initial step size of the search")
    popsize: Optional[int] = Field(None, ge=2, description="lambda, queries per step (none: 4 + floor(3 ln d))")


class CMAConfig(SepCMAConfig):
    """kind=cma-es: CMA-ES with the full covariance (d^2 memory; small d)."""

    kind: Literal["cma-es"] = Field("cma-es", description="CMA-ES with the full covariance (small d)")


# ------------------------------------------------------------------------- ES (estimator)


@register_estimator("es")
class ES(PlanEstimator):
    """Antithetic Gaussian ES with fitness shaping; q pairs (2q queries), sigma = mu (see the module doc)."""

    config_model = ESConfig

    def __init__(self, q: int = 16, mu: float = 0.02, shaping: Shaping = "centered-ranks", chunk: int | None = None):
        if q < 1:
            raise ValueError(f"q (antithetic pairs) must be >= 1, got {q}")
        self.q, self.mu, self.shaping, self.chunk = int(q), _check_mu(mu), _check_shaping(shaping), chunk

    @classmethod
    def from_config(cls, cfg: Any) -> "ES":
        return cls(q=cfg.q, mu=cfg.mu, shaping=cfg.shaping)

    def __repr__(self) -> str:
        return f"ES(q={self.q}, mu={self.mu}, shaping={self.shaping!r})"

    def plan(self, theta, *, coords=None, seed=None, chunk=256) -> QueryPlan:
        k = theta.numel() if coords is None else coords.numel()
        directions = SeededDirections(self.q, k, _draw_seed(seed), int(self.chunk or chunk), "gaussian")
        return QueryPlan.along(theta, directions, self.mu, "central", coords, label="ES estimate")

    def combine(self, plan, losses) -> Estimate:
        weights = _shaped_differences(losses, self.shaping) / self.q
        return Estimate(scatter_coords(plan.theta, plan.coords, losses.directions_sum(weights)), losses.queries,
                        losses.base_loss())


# --------------------------------------------------------------------------- Guided ES


@register_estimator("guided-es")
class GuidedES(PlanEstimator):
    """Guided ES: antithetic samples from N(0, sigma^2 ((alpha/d) I + ((1-alpha)/k) U U^T)), U spanning
    the last k estimates (Maheswaranathan et al. 2019, Algorithm 1); fitness shaping as `ES`."""

    config_model = GuidedESConfig

    def __init__(self, q: int = 16, mu: float = 0.02, k: int = 1, alpha: float = 0.5,
                 shaping: Shaping = "centered-ranks", chunk: int | None = None):
        if q < 1 or k < 1:
            raise ValueError(f"q and k must be >= 1, got q={q}, k={k}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.q, self.mu, self.k, self.alpha = int(q), _check_mu(mu), int(k), float(alpha)
        self.shaping, self.chunk = _check_shaping(shaping), chunk
        self._history: Tensor | None = None  # [<= k, dim] the last estimates (in the coords' space)

    @classmethod
    def from_config(cls, cfg: Any) -> "GuidedES":
        return cls(q=cfg.q, mu=cfg.mu, k=cfg.guide_k, alpha=cfg.guide_alpha, shaping=cfg.shaping)

    def __repr__(self) -> str:
        return f"GuidedES(q={self.q}, mu={self.mu}, k={self.k}, alpha={self.alpha}, shaping={self.shaping!r})"

    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = state.get("history")

    def directions_matrix(self, dim: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """[q, dim]: eps = sqrt(alpha/dim) z + sqrt((1-alpha)/k) U w, z ~ N(0, I_dim), w ~ N(0, I_k), scaled by
        sqrt(dim) so that E||eps||^2 = dim as for N(0, I) (the plan's step is then sigma = mu as in `ES`)."""
        z = torch.randn(self.q, dim, generator=generator, dtype=like.dtype)
        hist = self._history
        if hist is None or hist.shape[0] < self.k or hist.shape[1] != dim:
            return z.to(like.device)  # no guide yet: plain ES
        basis, _ = torch.linalg.qr(hist.T.to(like.dtype))  # [dim, k] orthonormal
        w = torch.randn(self.q, self.k, generator=generator, dtype=like.dtype)
        eps = math.sqrt(self.alpha) * z + math.sqrt((1 - self.alpha) * dim / self.k) * (w @ basis.T)
        return eps.to(like.device)

    def plan(self, theta, *, coords=None, seed=None, chunk=256) -> QueryPlan:
        gen = torch.Generator().manual_seed(_draw_seed(seed))
        dim = theta.numel() if coords is None else coords.numel()
        eps = self.directions_matrix(dim, gen, theta)
        return QueryPlan.along(theta, ExplicitDirections(eps, int(self.chunk or chunk)), self.mu, "central", coords,
                               label="guided-ES estimate")

    def combine(self, plan, losses) -> Estimate:
        weights = _shaped_differences(losses, self.shaping) / self.q
        g = losses.directions_sum(weights)
        row = g.detach().reshape(1, -1).clone()
        hist = self._history
        if hist is None or hist.shape[1] != row.shape[1]:
            hist = row
        else:
            hist = torch.cat([hist, row])[-self.k :]
        self._history = hist
        return Estimate(scatter_coords(plan.theta, plan.coords, g), losses.queries, losses.base_loss())


# ----------------------------------------------------------------------------- searches


@dataclass
class SearchStep:
    theta: Tensor  # the new mean: the trainer loads it into the parameters
    queries: int
    base_loss: float  # the mean loss of the population (the search's view of the loss at theta)


class Search(ABC):
    """A distribution-adapting search: samples around theta, proposes the next theta.

    `plan(theta, seed=...)` -> a point plan of the population (no queries); `tell(plan,
    losses)` -> `SearchStep` with the new mean. `plan` must be called before `tell` in the
    same process (it keeps the samples `tell` needs); `state_dict` / `load_state_dict` hold
    everything else, as tensors and numbers.
    """

    chunk: int | None = None

    @abstractmethod
    def plan(self, theta: Tensor, *, coords: Tensor | None = None, seed: int | None = None,
             chunk: int = 256) -> QueryPlan: ...

    @abstractmethod
    def tell(self, plan: QueryPlan, losses: PlanLosses) -> SearchStep: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @classmethod
    def from_config(cls, cfg: Any) -> "Search":
        raise NotImplementedError(f"{cls.__name__} has no from_config(EstimatorConfig)")

    def step(self, oracle, theta: Tensor, batch: Any, seed: int | None = None, *,
             sharder: PlanSharder | None = None) -> SearchStep:
        """plan -> execute -> tell, in one call."""
        plan = self.plan(theta, seed=seed, chunk=self.chunk or max(1, oracle.chunk_size(theta)))
        return self.tell(plan, execute(plan, oracle, batch, sharder=sharder))


def is_search(method: Any) -> bool:
    return isinstance(method, Search)


class _CMABase(Search):
    """The shared CMA-ES machinery (Hansen's tutorial, arXiv:1604.00772, Table 1 and eqs. (39)-(47))."""

    diagonal: bool = True

    def __init__(self, popsize: int | None = None, sigma: float = 0.02, chunk: int | None = None):
        if popsize is not None and popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {popsize}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.popsize, self.sigma0, self.chunk = popsize, float(sigma), chunk
        self.state: dict[str, Any] = {}
        self._pending: tuple[QueryPlan, Tensor, Tensor, Tensor] | None = None  # (plan, mean, z, y) of the last plan()

    @classmethod
    def from_config(cls, cfg: Any) -> "_CMABase":
        return cls(popsize=cfg.popsize, sigma=cfg.mu)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(popsize={self.popsize}, sigma={self.sigma0})"

    # -- constants (Table 1) ---------------------------------------------------------

    def constants(self, n: int) -> dict[str, float | Tensor]:
        lam = self.popsize or 4 + int(3 * math.log(n))
        mu = lam // 2
        w = torch.log(torch.tensor((lam + 1) / 2, dtype=torch.float64)) - torch.log(
            torch.arange(1, mu + 1, dtype=torch.float64))
        w = w / w.sum()
        mueff = float(1.0 / (w**2).sum())
        cs = (mueff + 2) / (n + mueff + 5)
        ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
        cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        c1 = 2 / ((n + 1.3) ** 2 + mueff)
        cmu = min(1 - c1, 2 * (0.25 + mueff + 1 / mueff - 2) / ((n + 2) ** 2 + mueff))
        if self.diagonal:  # Ros & Hansen 2008: the diagonal learns (n + 2) / 3 times faster
            c1, cmu = c1 * (n + 2) / 3, cmu * (n + 2) / 3
            if c1 + cmu > 1:
                scale = 1 / (c1 + cmu)
                c1, cmu = c1 * scale, cmu * scale
        chin = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        return {"lam": lam, "mu": mu, "weights": w, "mueff": mueff, "cs": cs, "ds": ds, "cc": cc, "c1": c1,
                "cmu": cmu, "chin": chin}

    def _init_state(self, n: int, like: Tensor) -> None:
        st = {"generation": 0, "sigma": self.sigma0, "n": n,
              "ps": torch.zeros(n, dtype=like.dtype), "pc": torch.zeros(n, dtype=like.dtype)}
        if self.diagonal:
            st["diag_c"] = torch.ones(n, dtype=like.dtype)
        else:
            st["cov"] = torch.eye(n, dtype=like.dtype)
            st["basis"] = torch.eye(n, dtype=like.dtype)
            st["scales"] = torch.ones(n, dtype=like.dtype)  # D: square roots of C's eigenvalues
        self.state = st

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)
        self._pending = None

    def reset(self) -> None:
        self.state, self._pending = {}, None

    @property
    def sigma(self) -> float:
        return float(self.state.get("sigma", self.sigma0))

    # -- sampling ---------------------------------------------------------------------

    def _y(self, z: Tensor) -> Tensor:
        st = self.state
        if self.diagonal:
            return z * st["diag_c"].sqrt()
        return (z * st["scales"]) @ st["basis"].T  # B D z

    def plan(self, theta, *, coords=None, seed=None, chunk=256) -> QueryPlan:
        if coords is not None:
            raise ValueError(f"{type(self).__name__} searches all coordinates; gradient sparsity (coords) does not apply")
        n = theta.numel()
        if not self.state or self.state.get("n") != n:
            self._init_state(n, theta)
        lam = self.constants(n)["lam"]
        gen = torch.Generator().manual_seed(_draw_seed(seed))
        z = torch.randn(lam, n, generator=gen, dtype=theta.dtype)
        y = self._y(z)
        points = theta.unsqueeze(0) + self.state["sigma"] * y
        plan = QueryPlan.at(points, chunk=self.chunk, label=f"{type(self).__name__} population")
        self._pending = (plan, theta, z, y)
        return plan

    # -- update (eqs. (39)-(47)) ------------------------------------------------------

    def tell(self, plan: QueryPlan, losses: PlanLosses) -> SearchStep:
        if self._pending is None or self._pending[0] is not plan:
            raise RuntimeError(f"{type(self).__name__}.tell needs the plan its last plan() call returned")
        _, theta, z, y = self._pending
        self._pending = None
        st, n = self.state, self.state["n"]
        k = self.constants(n)
        values = losses.plus
        order = torch.argsort(values, stable=True)[: k["mu"]]
        w = k["weights"].to(y.dtype)
        y_w = w @ y[order]  # <y>_w, eq. (41)
        sigma = st["sigma"]
        new_theta = theta + sigma * y_w  # eq. (41), c_m = 1
        cs, cc, c1, cmu, mueff = k["cs"], k["cc"], k["c1"], k["cmu"], k["mueff"]
        if self.diagonal:
            inv_sqrt_c_y = w @ z[order]  # C^{-1/2} <y>_w = D^{-1} <y>_w = <z>_w
        else:
            inv_sqrt_c_y = (w @ z[order]) @ st["basis"].T  # B D^{-1} B^T <y>_w = B <z>_w
        ps = (1 - cs) * st["ps"] + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt_c_y  # eq. (43)
        gen = st["generation"] + 1
        ps_norm = float(ps.norm())
        hsig = ps_norm / math.sqrt(1 - (1 - cs) ** (2 * gen)) < (1.4 + 2 / (n + 1)) * k["chin"]
        pc = (1 - cc) * st["pc"] + (math.sqrt(cc * (2 - cc) * mueff) if hsig else 0.0) * y_w  # eq. (45)
        delta_h = (1 - float(hsig)) * cc * (2 - cc)
        ysel = y[order]
        if self.diagonal:
            rank_mu = (w.unsqueeze(1) * ysel * ysel).sum(0)
            st["diag_c"] = (1 + c1 * delta_h - c1 - cmu) * st["diag_c"] + c1 * pc * pc + cmu * rank_mu  # eq. (47)
        else:
            rank_mu = (ysel.T * w) @ ysel
            cov = (1 + c1 * delta_h - c1 - cmu) * st["cov"] + c1 * torch.outer(pc, pc) + cmu * rank_mu
            cov = 0.5 * (cov + cov.T)
            evals, basis = torch.linalg.eigh(cov)
            st["cov"], st["basis"], st["scales"] = cov, basis, evals.clamp(min=1e-300).sqrt()
        st["sigma"] = sigma * math.exp((cs / k["ds"]) * (ps_norm / k["chin"] - 1))  # eq. (44)
        st["ps"], st["pc"], st["generation"] = ps, pc, gen
        return SearchStep(new_theta, losses.queries, float(values.mean()))


@register_estimator("sep-cma-es")
class SepCMAES(_CMABase):
    """sep-CMA-ES: CMA-ES with a diagonal covariance, O(d) per sample (Ros & Hansen 2008)."""

    config_model = SepCMAConfig
    diagonal = True


@register_estimator("cma-es")
class CMAES(_CMABase):
    """CMA-ES with the full covariance (Hansen's tutorial): O(d^2) memory, for small d."""

    config_model = CMAConfig
    diagonal = False
