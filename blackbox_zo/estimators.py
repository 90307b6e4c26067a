"""Finite-difference gradient estimators: CGE and RGE (DeepZero eq. (1); lecture 002).

Every estimator has one shape::

    estimator.estimate(oracle, theta, batch, coords=None, seed=None) -> Estimate

`coords` restricts the estimate to a subset of coordinates (how gradient sparsity
arrives); coordinates outside it get zero. Queries go through `oracle.query*`, so the
ledger sees each one, and `Estimate.queries` is the exact count of this call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .oracle import Oracle

__all__ = ["Estimate", "Estimator", "CGE", "RGE", "LinearInterpolation", "lasso_fista", "make_estimator"]


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
    kinds = {"cge": CGE, "rge": RGE, "linear-interpolation": LinearInterpolation}
    if kind not in kinds:
        raise ValueError(f"unknown estimator {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind](**kwargs)


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


class LinearInterpolation:
    """Gradient by linear interpolation with sparse recovery (lecture 002: linear interpolation, Lemma 2, LASSO).

    With m directions u_1..u_m (the rows of Q) and b_i = (l(theta + tau u_i) - l(theta)) / tau
    (central: (l(theta + tau u_i) - l(theta - tau u_i)) / (2 tau)), Taylor's formula gives
    Q g ~= b (lecture 002, "linear interpolation").

    * m = k (k = d, or |coords|): Q is square and the system is solved exactly. Lemma 2,
      ||g - grad l|| <= ||Q^{-1}|| sqrt(d) L tau / 2, says an orthonormal Q is the best choice:
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

    Rows of Q are unit vectors for every `directions` choice, so the perturbation tau u_i has the
    same size as CGE's step and the finite-difference bias is comparable.
    Queries: m + 1 (forward) or 2 m (central), through `oracle.query`.
    """

    DIRECTIONS = ("orthonormal", "dct", "rademacher", "gaussian", "coordinate")
    ORTHONORMAL = ("orthonormal", "dct", "coordinate")  # rows orthonormal: Q^{-1} = Q^T when m = k, ||Q||_2 = 1

    def __init__(
        self,
        m: int | None = None,
        tau: float = 5e-3,
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
        if scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        if not 0 <= lam < 1:
            raise ValueError(f"lam must be in [0, 1) (a fraction of lambda_max = ||Q^T b||_inf), got {lam}")
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.m = None if m is None else int(m)
        self.tau = _check_mu(tau)
        self.directions, self.scheme, self.lam = directions, scheme, float(lam)
        self.max_iters, self.tol, self.warm_start, self.debias, self.chunk = int(max_iters), float(tol), warm_start, debias, chunk
        self._previous: Tensor | None = None  # last solution, in the coordinates' space (warm start)
        self.last_iterations = 0  # FISTA iterations of the last call (0 for the exact solve)

    def __repr__(self) -> str:
        return (f"LinearInterpolation(m={self.m}, tau={self.tau}, directions={self.directions!r}, "
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

    def estimate(self, oracle, theta, batch, coords=None, seed=None) -> Estimate:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator().manual_seed(int(seed))
        coords = None if coords is None else coords.to(device=theta.device, dtype=torch.long)
        k = theta.numel() if coords is None else coords.numel()
        m = k if self.m is None else min(self.m, k)  # more than k directions carry no information
        oracle.ledger.ensure_available(m + 1 if self.scheme == "forward" else 2 * m)
        q = self.direction_matrix(m, k, gen, theta)
        chunk = self.chunk or max(1, oracle.chunk_size(theta))
        queries, base, rows, pair_means = 0, None, [], []
        if self.scheme == "forward":
            base = oracle.query(theta.unsqueeze(0), batch)[0]
            queries += 1
        for start in range(0, m, chunk):
            u = q[start : start + chunk]
            if self.scheme == "forward":
                rows.append((oracle.query(RGE._perturbed(theta, u, coords, self.tau), batch) - base) / self.tau)
                queries += u.shape[0]
            else:
                plus = oracle.query(RGE._perturbed(theta, u, coords, self.tau), batch)
                minus = oracle.query(RGE._perturbed(theta, u, coords, -self.tau), batch)
                rows.append((plus - minus) / (2 * self.tau))
                pair_means.append(0.5 * (plus + minus))
                queries += 2 * u.shape[0]
        b = torch.cat(rows).to(theta.dtype)
        g = self._solve(q, b, k)
        grad = torch.zeros_like(theta)
        if coords is None:
            grad += g
        else:
            grad[coords] = g
        base_loss = float(base) if base is not None else float(torch.cat(pair_means).mean())
        return Estimate(grad, queries, base_loss)

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
