"""Query plans — the points a method evaluates around theta — and the one executor that evaluates them.

Every zeroth-order method of the engine is three steps, and only the middle one queries::

    plan = method.plan(theta, ...)             # which points: a QueryPlan (no queries)
    losses = execute(plan, oracle, batch)      # the loss values, through the ledger
    estimate = method.combine(plan, losses)    # losses -> estimate or update (no queries)

A plan is one of three kinds (DeepZero eq. (1); lecture 002):

* **coordinates** — theta + mu e_i (and theta - mu e_i for the central scheme) for i in
  `coords` (all d when None): CGE, Sparse-CGE.
* **directions** — theta + mu u_k (and - mu u_k), k = 1..n: RGE, linear interpolation, and
  antithetic evolution strategies. The u_k come from a `SeededDirections` spec (seeded blocks
  of rows, so u_k depends only on the seed, k, d and the dtype, never on the chunking; drawn
  chunk by chunk, never all n x d at once) or an `ExplicitDirections` matrix; with `coords`
  they live in the span of those coordinates only.
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
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import Tensor

from . import parallel
from .oracle import NonFiniteLossError, Oracle, OracleError

__all__ = ["SeededDirections", "ExplicitDirections", "QueryPlan", "PlanLosses", "execute", "perturbed", "block_rows",
           "block_seed"]

Scheme = Literal["forward", "central"]

# The executor keeps the direction chunks it drew (so `combine` need not draw them again)
# when all of them fit in this fraction of the oracle's memory cap; otherwise they are redrawn.
_DRAWN_CACHE_FRACTION = 4


# ------------------------------------------------------------------------- directions


# A seeded direction stream is drawn in fixed blocks of rows, each from its own generator, so that
# direction i depends only on (seed, i, dim, dtype) and never on how the stream is cut into chunks
# (torch's CPU normal sampler depends on the size of each draw, and the chunk is a memory bound that
# changes with the oracle, the device and what the oracle has seen). A block holds about
# _BLOCK_NUMBERS numbers (512 KiB in float32): big enough that seeding a generator and calling
# normal_ per block cost under 1% of the draw, small beside any chunk's memory. A stream ending
# mid-block draws only what it needs (`_DirectionStream._prefix_ok`).
_BLOCK_NUMBERS = 2**17
_MAX_BLOCK_ROWS = 64
_GOLDEN32 = 0x9E3779B9  # odd: block b -> seed + b * _GOLDEN32 (mod 2^32) is one-to-one in b
_MASK64 = (1 << 64) - 1


def block_rows(dim: int) -> int:
    """Rows of one block of a seeded stream in R^dim: the largest power of two <= 2^17 / dim, in [1, 64]."""
    rows = max(1, _BLOCK_NUMBERS // max(1, int(dim)))
    return min(_MAX_BLOCK_ROWS, 1 << (rows.bit_length() - 1))


def _seed_hash32(seed: int) -> int:
    """splitmix64's finalizer of the seed, top 32 bits: seeds that differ by 2^32, or by one step, do
    not give related block seeds."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 32


def block_seed(seed: int, block: int) -> int:
    """The 32-bit seed of block `block` of the stream seeded `seed`.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so a block seed is 32
    bits: the stream's seed hashed to 32 bits plus a Weyl step per block, which keeps the blocks
    of one stream distinct (one-to-one in `block` for 2^32 blocks)."""
    return (_seed_hash32(seed) + int(block) * _GOLDEN32) & 0xFFFFFFFF


@dataclass(frozen=True)
class SeededDirections:
    """n random directions in R^dim from a seed, evaluated `chunk` at a time.

    gaussian: u ~ N(0, I); sphere: u ~ Unif(unit sphere) (a Gaussian row over its norm). The
    stream is drawn in blocks of `block_rows(dim)` rows, block b from a generator seeded
    `block_seed(seed, b)`, so direction i depends only on (seed, i, dim, dtype): the same for
    every chunk size, on every rank of a sharded run, in a resumed run, and in a plan of another
    count (a stream of 20 starts with the 12 of a stream of 12). `chunk` only says how many
    directions are evaluated at once. Memory: O((chunk + block) * dim), never O(n * dim).
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

    def stream(self, like: Tensor) -> "_DirectionStream":
        """A reader of the directions in like's dtype and device (it keeps the last block it drew)."""
        return _DirectionStream(self, like)

    def chunks(self, like: Tensor) -> Iterator[Tensor]:
        """The directions in order, [<= chunk, dim] at a time, in like's dtype and device."""
        stream = self.stream(like)
        for start in range(0, self.count, self.chunk):
            yield stream.rows(start, min(self.count, start + self.chunk))

    def identity(self) -> tuple:
        """What determines the directions (not the chunk: it only groups the evaluations)."""
        return ("seeded", self.count, self.dim, int(self.seed), self.distribution)


class _DirectionStream:
    """Rows of a `SeededDirections` stream, drawn block by block (see `block_seed`)."""

    def __init__(self, spec: SeededDirections, like: Tensor):
        self.spec, self.dtype, self.device = spec, like.dtype, like.device
        self.block = block_rows(spec.dim)
        self.generator = torch.Generator()
        self._hash = _seed_hash32(spec.seed)
        self._kept: tuple[int, Tensor] | None = None  # the last block drawn whole (a chunk may end inside it)

    def _draw(self, b: int, out: Tensor) -> Tensor:
        """Block b into `out` (contiguous, block x dim numbers, or a prefix of them: `_prefix_ok`): the
        numbers torch.randn(block, dim) would give."""
        self.generator.manual_seed((self._hash + b * _GOLDEN32) & 0xFFFFFFFF)  # = block_seed(seed, b)
        return out.normal_(generator=self.generator)

    def _copy(self, b: int, lo: int, hi: int, flat: Tensor, at: int) -> None:
        """Rows lo..hi-1 of block b into rows at.. of the [rows, dim] buffer `flat` (flattened, with room
        for 16 more numbers). A block cut by a chunk boundary is drawn whole, once, for both chunks; the
        stream's last block only as far as the stream goes (`_prefix_ok`), in place when it starts there."""
        dim = self.spec.dim
        dest = flat[at * dim : (at + hi - lo) * dim].view(hi - lo, dim)
        if self._kept is not None and self._kept[0] == b:
            dest.copy_(self._kept[1][lo:hi])
        elif b * self.block + hi == self.spec.count and lo == 0 and self._prefix_ok(hi):
            self._draw(b, flat[at * dim : at * dim + _round16(hi * dim)])
        elif b * self.block + hi == self.spec.count and self._prefix_ok(hi):
            dest.copy_(self._draw(b, torch.empty(_round16(hi * dim), dtype=self.dtype))[lo * dim : hi * dim].view(-1, dim))
        else:
            self._kept = (b, self._draw(b, torch.empty(self.block, dim, dtype=self.dtype)))
            dest.copy_(self._kept[1][lo:hi])

    def _prefix_ok(self, rows: int) -> bool:
        """Whether the first `rows` rows of a block can be drawn alone, as ~rows x dim numbers.

        torch's CPU normal_ on n >= 16 contiguous numbers draws n uniforms in order, then turns each
        aligned group of 16 into normals (Box-Muller) and, when 16 does not divide n, redraws the last
        16. So a draw of m numbers, m a multiple of 16, is the first m numbers of any longer draw that
        does not redraw them: of the whole block when m <= block x dim - 16, or 16 divides the block
        (tests/test_plan.py checks such prefixes against whole blocks, for both dtypes)."""
        m, full = _round16(rows * self.spec.dim), self.block * self.spec.dim
        return m <= full and (full % 16 == 0 or m <= full - 16)

    def rows(self, start: int, stop: int) -> Tensor:
        if not 0 <= start < stop <= self.spec.count:
            raise ValueError(f"directions [{start}, {stop}) are not in [0, {self.spec.count})")
        size, dim = self.block, self.spec.dim
        flat = torch.empty((stop - start) * dim + 16, dtype=self.dtype)  # + 16: room for a prefix drawn in place
        first, last = -(-start // size), stop // size  # blocks first..last-1 lie wholly in [start, stop)
        if first >= last:  # inside one block, or across one boundary
            b = start // size
            cut = min(stop, (b + 1) * size)
            self._copy(b, start - b * size, cut - b * size, flat, 0)
            if cut < stop:
                self._copy(b + 1, 0, stop - cut, flat, cut - start)
        else:
            if start < first * size:
                self._copy(first - 1, start - (first - 1) * size, size, flat, 0)
            step = size * dim
            at = (first * size - start) * dim
            for b in range(first, last):  # whole blocks drawn in place: no copy
                self._draw(b, flat[at : at + step])
                at += step
            if last * size < stop:
                self._copy(last, 0, stop - last * size, flat, last * size - start)
        out = flat[: (stop - start) * dim].view(stop - start, dim)
        if self.spec.distribution == "sphere":
            out /= out.norm(dim=1, keepdim=True)
        return out if out.device == self.device else out.to(self.device)


def _round16(n: int) -> int:
    return -(-n // 16) * 16


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

    def stream(self, like: Tensor) -> "ExplicitDirections":
        return self

    def rows(self, start: int, stop: int) -> Tensor:
        return self.matrix[start:stop]

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
            u = self.directions.stream(theta).rows(0, self.size)
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
        """sum_k weights[k] u_k over the plan's directions ([size] -> [dim]).

        Summed in fixed segments of `block_rows(dim)` directions, not per chunk: the rounding of
        the sum must not depend on the chunk either (a resumed run, another rank, another memory
        cap), so an estimate is bitwise the same for every chunking. Memory: O((chunk + block) * dim)."""
        plan = self.plan
        if plan.kind != "directions":
            raise ValueError(f"{plan.label}: directions_sum needs a direction plan, this is a {plan.kind} plan")
        theta = plan.theta
        acc = torch.zeros(plan.directions.dim, dtype=theta.dtype, device=theta.device)
        start = 0
        chunks = self.drawn if self.drawn is not None else plan.directions.chunks(theta)
        for u in _segments(chunks, block_rows(plan.directions.dim)):
            n = u.shape[0]
            acc += weights[start : start + n] @ u
            start += n
        return acc


def _segments(chunks: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    """The rows of consecutive chunks regrouped as [size, dim] pieces (the last one shorter)."""
    parts: list[Tensor] = []
    have = 0
    for u in chunks:
        i, n = 0, u.shape[0]
        while i < n:
            take = min(size - have, n - i)
            parts.append(u[i : i + take])
            have, i = have + take, i + take
            if have == size:
                yield parts[0] if len(parts) == 1 else torch.cat(parts)
                parts, have = [], 0
    if parts:
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


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
        return self._timed("model_inference", lambda: self.oracle.query_base(self.theta, self.batch))[0]

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
        """Losses at theta +/- mu u_k for k in [lo, hi), evaluated in the plan's chunks (the same
        groups on every rank). Direction k is the same whichever chunk draws it (SeededDirections),
        so a rank draws only the chunks it evaluates; with `keep` all of them, returned for combine."""
        plan, theta = self.plan, self.theta
        plus, minus, drawn = [], [], [] if keep else None
        stream = plan.directions.stream(theta)
        chunk = plan.directions.chunk
        for start in range(0, plan.size, chunk):
            stop = min(plan.size, start + chunk)
            if not keep and (stop <= lo or start >= hi):
                continue
            u = self._timed("direction_generation", lambda: stream.rows(start, stop))
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
