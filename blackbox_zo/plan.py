"""Query plans — the points a method evaluates around theta — and the one executor that evaluates them.

Every zeroth-order method of the engine is three steps, and only the middle one queries::

    plan = method.plan(theta, ...)             # which points: a QueryPlan (no queries)
    losses = execute(plan, oracle, batch)      # the loss values, through the ledger
    estimate = method.combine(plan, losses)    # losses -> estimate or update (no queries)

A plan is one of three kinds (DeepZero eq. (1); lecture 002):

* **coordinates** — theta + mu e_i (and theta - mu e_i for the central scheme) for i in
  `coords` (all d when None): CGE, Sparse-CGE.
* **directions** — theta + mu u_k (and - mu u_k), k = 1..n: RGE, linear interpolation, and
  antithetic evolution strategies. The u_k come from a `SeededDirections` spec (a seeded
  generator, drawn chunk by chunk: never all n x d at once) or an `ExplicitDirections`
  matrix; with `coords` they live in the span of those coordinates only.
* **points** — explicit parameter vectors [P, d] (population methods such as sep-CMA-ES).

Forward schemes also evaluate theta itself (the *base*). A plan's points have one canonical
order, ``[base] + plus + minus``: `QueryPlan.materialize` returns them in it and
`QueryPlan.split` turns losses in that order back into `PlanLosses`, so a plan can be handed
out (ask) and its losses handed back (tell) without `execute`.

`execute` picks the oracle's fast path — `Oracle.query_coordinates` (e.g. feature reuse)
for coordinates, batched `Oracle.query` in chunks bounded by the oracle's memory cap
otherwise — charges every loss value to the ledger (refusing, before the first query, a
plan the budget cannot pay for), and, given a `parallel.PlanSharder` under torchrun,
evaluates only this rank's share of the plan and all-reduces the losses, so every rank
returns the losses of the whole plan and every method runs in parallel without a copy of
its maths (see blackbox_zo/parallel.py for the cost model and the ledger's job total).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import Tensor

from . import parallel
from .oracle import NonFiniteLossError, Oracle, OracleError

__all__ = ["SeededDirections", "ExplicitDirections", "QueryPlan", "PlanLosses", "execute", "perturbed"]

Scheme = Literal["forward", "central"]

# The executor keeps the direction chunks it drew (so `combine` need not draw them again)
# when all of them fit in this fraction of the oracle's memory cap; otherwise they are redrawn.
_DRAWN_CACHE_FRACTION = 4


# ------------------------------------------------------------------------- directions


@dataclass(frozen=True)
class SeededDirections:
    """n random directions in R^dim from a seeded generator, drawn `chunk` at a time.

    gaussian: u ~ N(0, I); sphere: u ~ Unif(unit sphere). The same (seed, chunk) gives the
    same directions bitwise (torch's CPU normal sampler depends on the size of each draw,
    so the chunk is part of the spec). Memory: O(chunk * dim), never O(n * dim).
    """

    count: int
    dim: int
    seed: int
    chunk: int
    distribution: Literal["gaussian", "sphere"] = "gaussian"

    def __post_init__(self):
        if self.count < 1 or self.dim < 1 or self.chunk < 1:
            raise ValueError(f"SeededDirections needs count, dim, chunk >= 1, got {self.count}, {self.dim}, {self.chunk}")
        if self.distribution not in ("gaussian", "sphere"):
            raise ValueError(f"distribution must be 'gaussian' or 'sphere', got {self.distribution!r}")

    def chunks(self, like: Tensor) -> Iterator[Tensor]:
        """The directions in order, [<= chunk, dim] at a time, in like's dtype and device."""
        gen = torch.Generator().manual_seed(int(self.seed))
        for start in range(0, self.count, self.chunk):
            n = min(self.chunk, self.count - start)
            u = torch.randn(n, self.dim, generator=gen, dtype=like.dtype).to(like.device)
            if self.distribution == "sphere":
                u = u / u.norm(dim=1, keepdim=True)
            yield u

    def identity(self) -> tuple:
        return ("seeded", self.count, self.dim, int(self.seed), self.chunk, self.distribution)


@dataclass(frozen=True, eq=False)
class ExplicitDirections:
    """Directions given as the rows of a matrix [n, dim], evaluated `chunk` rows at a time."""

    matrix: Tensor
    chunk: int

    def __post_init__(self):
        if self.matrix.dim() != 2 or self.matrix.shape[0] < 1:
            raise ValueError(f"ExplicitDirections needs a matrix [n >= 1, dim], got shape {tuple(self.matrix.shape)}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    @property
    def count(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def chunks(self, like: Tensor) -> Iterator[Tensor]:
        for start in range(0, self.count, self.chunk):
            yield self.matrix[start : start + self.chunk]

    def identity(self) -> tuple:
        return ("explicit", self.chunk, self.matrix)


Directions = SeededDirections | ExplicitDirections


def perturbed(theta: Tensor, u: Tensor, coords: Tensor | None, step: float) -> Tensor:
    """[n, d]: theta + step * u_i for each row u_i (rows in the span of `coords` when given)."""
    thetas = theta.unsqueeze(0).repeat(u.shape[0], 1)
    if coords is None:
        thetas += step * u
    elif _is_range(coords):  # e.g. whole parameter blocks (estimator.blocks): a slice, not a scatter
        start = int(coords[0])
        thetas[:, start : start + coords.numel()] += step * u
    else:
        thetas[:, coords] += step * u
    return thetas


def _is_range(coords: Tensor) -> bool:
    """coords is start, start + 1, ..., start + n - 1 (n >= 1)."""
    n = coords.numel()
    return n > 0 and int(coords[-1]) - int(coords[0]) == n - 1 and bool((coords.diff() == 1).all())


# ------------------------------------------------------------------------------ plans


@dataclass(frozen=True, eq=False)
class QueryPlan:
    """Which points to evaluate around theta. Build with `coordinates`, `along` or `at`.

    `size` is the number of perturbations (coordinates, directions or points); `num_queries`
    the loss values the plan costs in one process (size + 1 forward, 2 size central, P points).
    `label` names the plan in errors and logs (e.g. "CGE estimate").
    """

    theta: Tensor
    kind: Literal["coordinates", "directions", "points"]
    mu: float = 0.0
    scheme: Scheme = "forward"
    coords: Tensor | None = None  # coordinates: which e_i (None: all); directions: their subspace
    directions: Directions | None = None
    points: Tensor | None = None  # [P, d]
    chunk: int | None = None  # points per oracle call for the points kind (None: the oracle's chunk)
    label: str = "query plan"

    # -- constructors ----------------------------------------------------------------

    @classmethod
    def coordinates(cls, theta: Tensor, mu: float, coords: Tensor | None = None, scheme: Scheme = "forward",
                    label: str = "coordinate plan") -> "QueryPlan":
        _check_step(mu, scheme)
        if coords is not None:
            coords = coords.to(device=theta.device, dtype=torch.long)
        return cls(theta, "coordinates", float(mu), scheme, coords=coords, label=label)

    @classmethod
    def along(cls, theta: Tensor, directions: Directions, mu: float, scheme: Scheme = "forward",
              coords: Tensor | None = None, label: str = "direction plan") -> "QueryPlan":
        _check_step(mu, scheme)
        if coords is not None:
            coords = coords.to(device=theta.device, dtype=torch.long)
        k = theta.numel() if coords is None else coords.numel()
        if directions.dim != k:
            raise ValueError(f"directions have dimension {directions.dim}, the plan's space has {k}")
        return cls(theta, "directions", float(mu), scheme, coords=coords, directions=directions, label=label)

    @classmethod
    def at(cls, points: Tensor, chunk: int | None = None, label: str = "point plan") -> "QueryPlan":
        if points.dim() != 2 or points.shape[0] < 1:
            raise ValueError(f"a point plan needs points [P >= 1, d], got shape {tuple(points.shape)}")
        return cls(points[0], "points", points=points, chunk=chunk, label=label)

    # -- what the plan costs ---------------------------------------------------------

    @property
    def size(self) -> int:
        if self.kind == "coordinates":
            return self.theta.numel() if self.coords is None else self.coords.numel()
        if self.kind == "directions":
            return self.directions.count
        return int(self.points.shape[0])

    @property
    def has_base(self) -> bool:
        return self.kind != "points" and self.scheme == "forward"

    @property
    def central(self) -> bool:
        return self.kind != "points" and self.scheme == "central"

    @property
    def num_queries(self) -> int:
        return 2 * self.size if self.central else self.size + int(self.has_base)

    def coord_indices(self) -> Tensor:
        """The coordinates of a coordinate plan (arange(d) when it names none)."""
        if self.coords is None:
            return torch.arange(self.theta.numel(), device=self.theta.device)
        return self.coords

    # -- ask / tell --------------------------------------------------------------------

    def materialize(self) -> Tensor:
        """All points [num_queries, d] in canonical order ([base] + plus + minus) — for handing a
        plan out (ask); costs num_queries x d memory, which `execute` never does."""
        theta = self.theta
        if self.kind == "points":
            return self.points.clone()
        parts = [theta.unsqueeze(0)] if self.has_base else []
        if self.kind == "coordinates":
            c = self.coord_indices()
            rows = torch.arange(c.numel(), device=theta.device)
            for step in (self.mu, -self.mu) if self.central else (self.mu,):
                thetas = theta.unsqueeze(0).repeat(c.numel(), 1)
                thetas[rows, c] += step
                parts.append(thetas)
        else:
            u = torch.cat(list(self.directions.chunks(theta)))
            for step in (self.mu, -self.mu) if self.central else (self.mu,):
                parts.append(perturbed(theta, u, self.coords, step))
        return torch.cat(parts)

    def split(self, values: Tensor, queries: int | None = None) -> "PlanLosses":
        """Losses in canonical order (e.g. from evaluating `materialize()`) -> PlanLosses (tell)."""
        values = values.reshape(-1)
        if values.numel() != self.num_queries:
            raise ValueError(f"{self.label}: expected {self.num_queries} loss values, got {values.numel()}")
        n, i = self.size, 0
        base = None
        if self.has_base:
            base, i = values[0], 1
        plus = values[i : i + n]
        minus = values[i + n : i + 2 * n] if self.central else None
        return PlanLosses(self, base, plus, minus, self.num_queries if queries is None else queries)

    def identity(self) -> tuple:
        """What every rank must agree on to share the plan's work (not theta: the trainer checks it)."""
        ident = (self.kind, self.size, self.mu, self.scheme, self.coords)
        if self.kind == "directions":
            ident += self.directions.identity()
        if self.kind == "points":
            ident += (self.points,)
        return ident


def _check_step(mu: float, scheme: str) -> None:
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    if scheme not in ("forward", "central"):
        raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")


@dataclass
class PlanLosses:
    """The loss values of a plan: `base` (forward schemes, a 0-dim tensor), `plus` [size] at
    theta + mu v_i (for a point plan: the losses of the points), `minus` [size] at theta - mu v_i
    (central schemes), and `queries`, the loss values the plan cost (the job's total under torchrun)."""

    plan: QueryPlan
    base: Tensor | None
    plus: Tensor
    minus: Tensor | None
    queries: int
    drawn: list[Tensor] | None = field(default=None, repr=False)  # direction chunks kept by execute

    def differences(self) -> Tensor:
        """Finite differences along each perturbation: (l+ - l0) / mu, or (l+ - l-) / (2 mu)."""
        mu = self.plan.mu
        if self.minus is not None:
            return (self.plus - self.minus) / (2 * mu)
        return (self.plus - self.base) / mu

    def base_loss(self) -> float:
        """l(theta); for central schemes the mean of the +/- pairs (O(mu^2) accurate); NaN if unknown."""
        if self.base is not None:
            return float(self.base)
        if self.minus is not None:
            return float((0.5 * (self.plus + self.minus)).mean())
        return float("nan")

    def directions_sum(self, weights: Tensor) -> Tensor:
        """sum_k weights[k] u_k over the plan's directions ([size] -> [dim]), chunk by chunk."""
        plan = self.plan
        if plan.kind != "directions":
            raise ValueError(f"{plan.label}: directions_sum needs a direction plan, this is a {plan.kind} plan")
        theta = plan.theta
        acc = torch.zeros(plan.directions.dim, dtype=theta.dtype, device=theta.device)
        start = 0
        for u in self.drawn if self.drawn is not None else plan.directions.chunks(theta):
            n = u.shape[0]
            acc += weights[start : start + n] @ u
            start += n
        return acc


# --------------------------------------------------------------------------- executor


def execute(plan: QueryPlan, oracle: Oracle, batch: Any, *, sharder: "parallel.PlanSharder | None" = None,
            profile: dict[str, float] | None = None, fast_path: bool = True) -> PlanLosses:
    """Evaluate `plan` on `oracle` for `batch` — the only place the engine queries an oracle.

    * Every loss value goes through `oracle.query` / `oracle.query_coordinates` (charged to
      the ledger's current phase); a plan the budget cannot pay for is refused before its
      first query (`QueryBudgetExceeded`).
    * Coordinates use `query_coordinates` (the oracle's fast path); `fast_path=False` builds
      the perturbed vectors here and calls `query` instead (a reference path for timing).
      Directions and points go to `query` in chunks (the plan's, or `oracle.chunk_size`).
    * `sharder` (a `parallel.PlanSharder` of more than one rank): this rank evaluates its
      share, the losses are all-reduced, and every rank returns the whole plan's losses with
      `queries` = the job's count (see blackbox_zo/parallel.py).
    * `profile`: seconds are added under "direction_generation", "weight_perturbation" and
      "model_inference" (DeepZero Table A1's stages; combining is the caller's "arithmetic").
    """
    if sharder is not None and sharder.world > 1:
        return _execute_sharded(plan, oracle, batch, sharder, profile, fast_path)
    oracle.ledger.ensure_available(plan.num_queries)
    run = _Runner(plan, oracle, batch, profile, fast_path)
    base = run.base() if plan.has_base else None
    if plan.kind == "coordinates":
        coords = plan.coord_indices()
        plus = run.coordinates(coords, plan.mu)
        minus = run.coordinates(coords, -plan.mu) if plan.central else None
        return PlanLosses(plan, base, plus, minus, plan.num_queries)
    if plan.kind == "directions":
        plus, minus, drawn = run.directions(0, plan.size, keep=_keep_drawn(plan, oracle))
        return PlanLosses(plan, base, plus, minus, plan.num_queries, drawn)
    return PlanLosses(plan, None, run.points(0, plan.size), None, plan.num_queries)


def _keep_drawn(plan: QueryPlan, oracle: Oracle) -> bool:
    d = plan.directions
    return d.count * d.dim * plan.theta.element_size() <= oracle.memory_cap_bytes // _DRAWN_CACHE_FRACTION


class _Runner:
    """The evaluation loops of one plan on one rank (a piece [lo, hi) of its perturbations)."""

    def __init__(self, plan: QueryPlan, oracle: Oracle, batch: Any, profile: dict[str, float] | None, fast_path: bool):
        self.plan, self.oracle, self.batch, self.profile, self.fast_path = plan, oracle, batch, profile, fast_path
        self.theta = plan.theta

    def _timed(self, stage: str, fn):
        if self.profile is None:
            return fn()
        start = time.perf_counter()
        out = fn()
        self.profile[stage] = self.profile.get(stage, 0.0) + time.perf_counter() - start
        return out

    def _query(self, thetas: Tensor) -> Tensor:
        return self._timed("model_inference", lambda: self.oracle.query(thetas, self.batch))

    def base(self) -> Tensor:
        return self._query(self.theta.unsqueeze(0))[0]

    def coordinates(self, coords: Tensor, step: float) -> Tensor:
        """Losses at theta + step e_j for j in coords."""
        theta = self.theta
        if self.fast_path:
            return self._timed("model_inference", lambda: self.oracle.query_coordinates(theta, coords, step, self.batch))
        chunk = max(1, self.oracle.chunk_size(theta))
        out = []
        for start in range(0, coords.numel(), chunk):
            c = coords[start : start + chunk]

            def perturb() -> Tensor:
                thetas = theta.unsqueeze(0).repeat(c.numel(), 1)
                thetas[torch.arange(c.numel(), device=theta.device), c] += step
                return thetas

            out.append(self._query(self._timed("weight_perturbation", perturb)))
        return torch.cat(out) if out else theta.new_empty(0)

    def directions(self, lo: int, hi: int, keep: bool) -> tuple[Tensor, Tensor | None, list[Tensor] | None]:
        """Losses at theta +/- mu u_k for k in [lo, hi). The stream is drawn from its start (every
        rank draws the same directions); with `keep` all of it is drawn and returned."""
        plan, theta = self.plan, self.theta
        plus, minus, drawn = [], [], [] if keep else None
        chunks = plan.directions.chunks(theta)
        start = 0
        while start < plan.size and (keep or start < hi):
            u = self._timed("direction_generation", lambda: next(chunks))
            n = u.shape[0]
            if drawn is not None:
                drawn.append(u)
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                part = u[a - start : b - start]
                m = part.shape[0]
                if plan.central and 2 * m <= max(1, self.oracle.chunk_size(theta)):
                    # both signs in one oracle call: a population of 2m runs faster than two of m
                    both = self._query(self._timed("weight_perturbation", lambda: torch.cat(
                        [perturbed(theta, part, plan.coords, plan.mu), perturbed(theta, part, plan.coords, -plan.mu)])))
                    plus.append(both[:m])
                    minus.append(both[m:])
                else:
                    plus.append(self._query(self._timed("weight_perturbation",
                                                         lambda: perturbed(theta, part, plan.coords, plan.mu))))
                    if plan.central:
                        minus.append(self._query(self._timed("weight_perturbation",
                                                              lambda: perturbed(theta, part, plan.coords, -plan.mu))))
            start += n
        empty = theta.new_empty(0)
        return (torch.cat(plus) if plus else empty, (torch.cat(minus) if minus else empty) if plan.central else None,
                drawn)

    def points(self, lo: int, hi: int) -> Tensor:
        plan = self.plan
        chunk = plan.chunk or max(1, self.oracle.chunk_size(self.theta))
        out = [self._query(plan.points[s : min(hi, s + chunk)]) for s in range(lo, hi, chunk)]
        return torch.cat(out) if out else self.theta.new_empty(0)


# ------------------------------------------------------------------------- sharded


def _execute_sharded(plan: QueryPlan, oracle: Oracle, batch: Any, sharder: "parallel.PlanSharder",
                     profile: dict[str, float] | None, fast_path: bool) -> PlanLosses:
    """This rank's share of the plan, then one all-reduce of the losses (zeros elsewhere, so the
    sum is exact): every rank returns the losses a single process would have evaluated."""
    world, rank = sharder.world, sharder.rank
    n, theta = plan.size, plan.theta
    total = plan.num_queries + (world - 1 if plan.has_base else 0)  # every rank evaluates the base itself
    oracle.ledger.ensure_available(total)
    run = _Runner(plan, oracle, batch, profile, fast_path)
    width = 2 * n if plan.central else n
    values = torch.zeros(width, dtype=torch.float64, device=theta.device)
    failure, base, drawn, before = None, None, None, oracle.ledger.total
    clock = parallel.cost_clock
    t0 = clock(theta)
    seconds = 0.0
    try:
        if plan.has_base:
            base = run.base()
        t1 = clock(theta)  # the base loss is every rank's, not the shard's
        if plan.kind == "coordinates":
            if plan.coords is None:  # all coordinates: arange(d) is sorted already
                sorted_coords = order = plan.coord_indices()
            else:
                coords = plan.coords
                order = torch.argsort(coords, stable=True)  # pieces are contiguous in the sorted set (blocks)
                sorted_coords = coords[order]
            piece = sharder.coordinate_piece(oracle.space, sorted_coords)
            mine, where = sorted_coords[piece].contiguous(), order[piece]  # a strided share while calibrating
            for offset, step in ((0, plan.mu), (n, -plan.mu)) if plan.central else ((0, plan.mu),):
                measured = sharder.measure_coordinates(lambda c: run.coordinates(c, step), oracle.space, mine, theta)
                values[offset + where] = measured.double()
        else:
            bounds = parallel.balanced_bounds(torch.ones(n), world)  # all perturbations cost alike
            lo, hi = bounds[rank], bounds[rank + 1]
            if plan.kind == "directions":
                plus, minus, drawn = run.directions(lo, hi, keep=_keep_drawn(plan, oracle))
                values[lo:hi] = plus.double()
                if plan.central:
                    values[n + lo : n + hi] = minus.double()
            else:
                values[lo:hi] = run.points(lo, hi).double()
        seconds = clock(theta) - t1
    except (OracleError, NonFiniteLossError) as exc:
        failure = exc
        values.zero_()
    local = oracle.ledger.total - before  # what this rank charged, a failed call included
    try:
        reduced = sharder.reduce(values, local_queries=local, seconds=seconds, failure=failure, plan_key=plan.identity(),
                                 what=f"all-reduce of the {plan.label} ({n} {plan.kind})", elapsed=clock(theta) - t0)
        oracle.ledger.charge(reduced.queries - local)  # every rank's ledger holds the job's count
        reduced.raise_if_failed(failure)
        if plan.kind == "coordinates":
            sharder.learn_costs(oracle.space, reduced.seconds)
    finally:
        if plan.kind == "coordinates":
            sharder.coordinate_plan_done()
    losses = reduced.values.to(theta.dtype)
    return PlanLosses(plan, base, losses[:n], losses[n:] if plan.central else None, reduced.queries, drawn)
