"""Finite-difference gradient estimators: CGE and RGE (DeepZero eq. (1); lecture 002).

Every estimator has one shape::

    estimator.estimate(oracle, theta, batch, coords=None, seed=None) -> Estimate

`coords` restricts the estimate to a subset of coordinates (how gradient sparsity
arrives); coordinates outside it get zero. Queries go through `oracle.query*`, so the
ledger sees each one, and `Estimate.queries` is the exact count of this call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .oracle import Oracle

__all__ = ["Estimate", "Estimator", "CGE", "RGE", "make_estimator"]


@dataclass
class Estimate:
    grad: Tensor  # [d]
    queries: int  # loss values requested by this estimate
    base_loss: float  # loss at theta (for central schemes: mean of the +/- pairs, O(mu^2) accurate)


class Estimator(Protocol):
    def estimate(
        self, oracle: Oracle, theta: Tensor, batch: Any, coords: Tensor | None = None, seed: int | None = None
    ) -> Estimate: ...


def _all_coords(theta: Tensor) -> Tensor:
    return torch.arange(theta.numel(), device=theta.device)


def _check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return float(mu)


class CGE:
    """Coordinate-wise gradient estimate (DeepZero eq. (1), CGE; Sparse-CGE with `coords`).

    forward: g_j = (l(theta + mu e_j) - l(theta)) / mu      |S| + 1 queries, error <= L mu / 2 per coordinate
    central: g_j = (l(theta + mu e_j) - l(theta - mu e_j)) / (2 mu)   2 |S| queries, error O(mu^2)
    """

    def __init__(self, mu: float = 5e-3, scheme: Literal["forward", "central"] = "forward"):
        self.mu = _check_mu(mu)
        if scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        self.scheme = scheme

    def __repr__(self) -> str:
        return f"CGE(mu={self.mu}, scheme={self.scheme!r})"

    def estimate(self, oracle, theta, batch, coords=None, seed=None) -> Estimate:
        coords = _all_coords(theta) if coords is None else coords.to(device=theta.device, dtype=torch.long)
        oracle.ledger.ensure_available(coords.numel() + 1 if self.scheme == "forward" else 2 * coords.numel())
        grad = torch.zeros_like(theta)
        if self.scheme == "forward":
            base = oracle.query(theta.unsqueeze(0), batch)[0]
            plus = oracle.query_coordinates(theta, coords, self.mu, batch)
            grad[coords] = (plus - base) / self.mu
            return Estimate(grad, coords.numel() + 1, float(base))
        plus = oracle.query_coordinates(theta, coords, self.mu, batch)
        minus = oracle.query_coordinates(theta, coords, -self.mu, batch)
        grad[coords] = (plus - minus) / (2 * self.mu)
        base = float(0.5 * (plus + minus).mean()) if coords.numel() else float("nan")
        return Estimate(grad, 2 * coords.numel(), base)


class RGE:
    """Randomized gradient estimate with q directions (DeepZero eq. (1), RGE; lecture 002).

    gaussian: u ~ N(0, I),            g = (1/q) sum_i [(l(theta + mu u_i) - l(theta)) / mu] u_i
    sphere:   u ~ Unif(unit sphere),  g = (d/q) sum_i [(l(theta + mu u_i) - l(theta)) / mu] u_i
    (central: the difference becomes (l(theta + mu u) - l(theta - mu u)) / (2 mu).)

    Both are unbiased for the gradient of the mu-smoothed loss. Directions are drawn in
    chunks from a generator seeded by `seed`, so memory is O(chunk * d), never O(q * d),
    and the same seed reproduces the same directions. With `coords`, directions live in
    the span of those coordinates and d becomes |coords|.
    """

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
        if scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        self.q, self.mu, self.distribution, self.scheme, self.chunk = int(q), _check_mu(mu), distribution, scheme, chunk

    def __repr__(self) -> str:
        return f"RGE(q={self.q}, mu={self.mu}, distribution={self.distribution!r}, scheme={self.scheme!r})"

    def directions(self, n: int, k: int, generator: torch.Generator, like: Tensor) -> Tensor:
        u = torch.randn(n, k, generator=generator, dtype=like.dtype).to(like.device)
        if self.distribution == "sphere":
            u = u / u.norm(dim=1, keepdim=True)
        return u

    def estimate(self, oracle, theta, batch, coords=None, seed=None, *, directions_out: list | None = None) -> Estimate:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator().manual_seed(int(seed))
        coords = None if coords is None else coords.to(device=theta.device, dtype=torch.long)
        k = theta.numel() if coords is None else coords.numel()
        chunk = self.chunk or max(1, oracle.chunk_size(theta))
        oracle.ledger.ensure_available(self.q + 1 if self.scheme == "forward" else 2 * self.q)
        acc = torch.zeros(k, dtype=theta.dtype, device=theta.device)
        queries = 0
        base = None
        if self.scheme == "forward":
            base = oracle.query(theta.unsqueeze(0), batch)[0]
            queries += 1
        pair_means = []
        for start in range(0, self.q, chunk):
            n = min(chunk, self.q - start)
            u = self.directions(n, k, gen, theta)
            if directions_out is not None:
                directions_out.append(u)
            if self.scheme == "forward":
                diffs = (oracle.query(self._perturbed(theta, u, coords, self.mu), batch) - base) / self.mu
                queries += n
            else:
                plus = oracle.query(self._perturbed(theta, u, coords, self.mu), batch)
                minus = oracle.query(self._perturbed(theta, u, coords, -self.mu), batch)
                diffs = (plus - minus) / (2 * self.mu)
                pair_means.append(0.5 * (plus + minus))
                queries += 2 * n
            acc += diffs @ u
        scale = (k if self.distribution == "sphere" else 1.0) / self.q
        grad = torch.zeros_like(theta)
        if coords is None:
            grad += acc * scale
        else:
            grad[coords] = acc * scale
        base_loss = float(base) if base is not None else float(torch.cat(pair_means).mean())
        return Estimate(grad, queries, base_loss)

    @staticmethod
    def _perturbed(theta: Tensor, u: Tensor, coords: Tensor | None, step: float) -> Tensor:
        thetas = theta.unsqueeze(0).repeat(u.shape[0], 1)
        if coords is None:
            thetas += step * u
        else:
            thetas[:, coords] += step * u
        return thetas


def make_estimator(kind: str, **kwargs: Any):
    kinds = {"cge": CGE, "rge": RGE}
    if kind not in kinds:
        raise ValueError(f"unknown estimator {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind](**kwargs)
