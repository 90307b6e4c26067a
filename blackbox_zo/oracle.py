"""The one contract of the engine: an `Oracle` maps parameter vectors to loss values.

Everything else (estimators, sparsity, feature reuse, parallelism, the trainer) is
built on `Oracle.losses` / `Oracle.coordinate_losses` and never sees a gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .registry import ORACLES, UnknownNameError

__all__ = [
    "Block",
    "ParamSpace",
    "QueryLedger",
    "QueryBudgetExceeded",
    "NonFiniteLossError",
    "OracleError",
    "TransientOracleError",
    "job_ledger",
    "Oracle",
    "coordinate_losses_in_chunks",
    "ORACLES",
    "register_oracle",
    "make_oracle",
    "available_oracles",
    "UnknownNameError",
    "CheckResult",
    "CheckReport",
    "check_oracle",
    "DEFAULT_MEMORY_CAP_BYTES",
]

# Perturbed parameter vectors built at once by the default coordinate path.
DEFAULT_MEMORY_CAP_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- space


@dataclass(frozen=True)
class Block:
    """One named block of the flat parameter vector: theta[offset : offset + numel]."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.stop)


class ParamSpace:
    """Ordered named blocks (name, shape) laid end to end in one flat vector of size d."""

    def __init__(self, blocks: Iterable[tuple[str, Sequence[int]]]):
        self.blocks: list[Block] = []
        offset = 0
        seen: set[str] = set()
        for name, shape in blocks:
            if name in seen:
                raise ValueError(f"ParamSpace: duplicate block name {name!r}")
            seen.add(name)
            block = Block(name, tuple(int(s) for s in shape), offset)
            self.blocks.append(block)
            offset = block.stop
        if not self.blocks:
            raise ValueError("ParamSpace needs at least one block")
        self.dim = offset
        self._index = {b.name: i for i, b in enumerate(self.blocks)}
        self._starts = torch.tensor([b.offset for b in self.blocks], dtype=torch.long)

    @classmethod
    def from_module(cls, module: nn.Module, trainable_only: bool = True) -> "ParamSpace":
        return cls(
            (name, tuple(p.shape))
            for name, p in module.named_parameters()
            if p.requires_grad or not trainable_only
        )

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __getitem__(self, name: str) -> Block:
        return self.blocks[self._index[name]]

    def __repr__(self) -> str:
        return f"ParamSpace(d={self.dim}, blocks={[(b.name, b.shape) for b in self.blocks]})"

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def coords_of(self, names: Sequence[str]) -> Tensor:
        """Flat indices (sorted, int64) of the blocks that `names` select: a name selects the block of
        that name and every block under it ("6" selects "6.weight" and "6.bias"). ValueError, naming
        the blocks there are, for a name that selects nothing."""
        chosen: list[Block] = []
        for name in names:
            hits = [b for b in self.blocks if b.name == name or b.name.startswith(f"{name}.")]
            if not hits:
                raise ValueError(f"no parameter block {name!r} (blocks: {', '.join(self.names)})")
            chosen.extend(b for b in hits if b not in chosen)
        chosen.sort(key=lambda b: b.offset)
        return torch.cat([torch.arange(b.offset, b.stop, dtype=torch.long) for b in chosen])

    def block_index(self, coords: Tensor) -> Tensor:
        """Index of the block each flat coordinate belongs to."""
        return torch.searchsorted(self._starts, coords.to(torch.long), right=True) - 1

    def views(self, theta: Tensor) -> dict[str, Tensor]:
        """Block views of a flat vector [d] (no copy) -> {name: tensor of the block's shape}."""
        self._check_last_dim(theta)
        return {b.name: theta[..., b.slice].view(*theta.shape[:-1], *b.shape) for b in self.blocks}

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate block tensors (in block order) into a new flat vector."""
        if isinstance(tensors, dict):
            tensors = [tensors[b.name] for b in self.blocks]
        if len(tensors) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} tensors, got {len(tensors)}")
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def params_of(self, module: nn.Module) -> list[nn.Parameter]:
        named = dict(module.named_parameters())
        missing = [b.name for b in self.blocks if b.name not in named]
        if missing:
            raise KeyError(f"module has no parameters named {missing}")
        return [named[b.name] for b in self.blocks]

    def flatten_module(self, module: nn.Module) -> Tensor:
        return self.flatten(self.params_of(module))

    def load_into(self, module: nn.Module, theta: Tensor) -> None:
        """Copy a flat vector into the module's parameters (in place, no autograd)."""
        with torch.no_grad():
            for p, v in zip(self.params_of(module), self.views(theta).values()):
                p.copy_(v)

    def write_grad(self, params: Sequence[Tensor], grad: Tensor) -> None:
        """Write a flat gradient estimate into each parameter's .grad (what torch.optim reads)."""
        self._check_last_dim(grad)
        for p, b in zip(params, self.blocks):
            g = grad[b.slice].view(b.shape).to(dtype=p.dtype, device=p.device)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def _check_last_dim(self, t: Tensor) -> None:
        if t.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(t.shape)}")


# -------------------------------------------------------------------------- ledger


class QueryBudgetExceeded(RuntimeError):
    """Raised *before* a request for loss values that would exceed the ledger's budget.

    `budget`, `used`, `requested` and `phase` say by how much (None when raised by hand).
    """

    def __init__(self, message: str, *, budget: int | None = None, used: int | None = None,
                 requested: int | None = None, phase: str | None = None):
        super().__init__(message)
        self.budget, self.used, self.requested, self.phase = budget, used, requested, phase


class NonFiniteLossError(FloatingPointError):
    """An oracle returned NaN or infinite loss values."""


class OracleError(RuntimeError):
    """An oracle raised or broke its contract; wraps the original exception."""


class TransientOracleError(Exception):
    """Raise this from `losses` / `coordinate_losses` for a failure worth retrying: a timeout,
    a dropped connection, a busy server. The engine retries the same request up to
    `run.oracle_retries` times, waiting `run.oracle_retry_backoff_s` x 2^k seconds before
    retry k + 1; any other exception is permanent and stops the run at once. A retried
    request is charged to the ledger once; its retries are counted in `ledger.retried`.
    """


PHASES = ("train", "prune", "eval")


class QueryLedger:
    """Counts every loss value requested from an oracle, by phase, with an optional hard budget.

    A request is charged once, before it is sent. `max_retries` / `retry_backoff_s` is the
    job's policy for requests that fail with TransientOracleError; re-sent loss values are
    counted in `retried`, not charged again (so a flaky oracle leaves the counts, the budget
    and the trajectory of a run exactly as a reliable one would).
    """

    def __init__(self, budget: int | None = None, max_retries: int = 0, retry_backoff_s: float = 1.0):
        if budget is not None and budget < 0:
            raise ValueError(f"query budget must be >= 0, got {budget}")
        if max_retries < 0 or retry_backoff_s < 0:
            raise ValueError("max_retries and retry_backoff_s must be >= 0")
        self.budget = budget
        self.counts: dict[str, int] = {p: 0 for p in PHASES}
        self.phase_name = "train"
        self.busy_seconds = 0.0
        self.max_retries, self.retry_backoff_s = int(max_retries), float(retry_backoff_s)
        self.retried = 0  # loss values re-sent after a transient failure (not in counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.total

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.counts:
            self.counts[name] = 0
        previous, self.phase_name = self.phase_name, name
        try:
            yield self
        finally:
            self.phase_name = previous

    def charge(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot charge a negative number of queries")
        if self.budget is not None and self.total + n > self.budget:
            raise QueryBudgetExceeded(
                f"query budget {self.budget} would be exceeded: {self.total} used, {n} more requested",
                budget=self.budget, used=self.total, requested=n, phase=self.phase_name)
        self.counts[self.phase_name] = self.counts.get(self.phase_name, 0) + n

    def ensure_available(self, n: int) -> None:
        """Raise before starting work that needs n more queries than the budget has left."""
        if self.budget is not None and self.total + n > self.budget:
            raise QueryBudgetExceeded(
                f"query budget {self.budget} would be exceeded: {self.total} used, {n} more needed",
                budget=self.budget, used=self.total, requested=n, phase=self.phase_name)

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` + 1 (exponential, at most 60 s)."""
        return min(60.0, self.retry_backoff_s * 2.0 ** attempt)

    def rate(self) -> float:
        """Queries per second of time spent inside the oracle."""
        return self.total / self.busy_seconds if self.busy_seconds > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "counts": dict(self.counts), "busy_seconds": self.busy_seconds,
                "retried": self.retried}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget = state["budget"]
        self.counts = dict(state["counts"])
        self.busy_seconds = float(state["busy_seconds"])
        self.retried = int(state.get("retried", 0))


# The ledger of the job being set up: an oracle created while one is active (inside
# `with job_ledger(l):`) starts with it, so a problem's setup queries (ZO-GraSP pruning)
# are counted and budgeted before the trainer exists.
_JOB_LEDGER: contextvars.ContextVar[QueryLedger | None] = contextvars.ContextVar("blackbox_zo_job_ledger",
                                                                                 default=None)


@contextlib.contextmanager
def job_ledger(ledger: QueryLedger):
    """Oracles whose ledger is first used inside this block use `ledger` (budget and retries included)."""
    token = _JOB_LEDGER.set(ledger)
    try:
        yield ledger
    finally:
        _JOB_LEDGER.reset(token)


# -------------------------------------------------------------------------- oracle


def coordinate_losses_in_chunks(losses: Callable[[Tensor, Any], Tensor], theta: Tensor, coords: Tensor, mu: float,
                                batch: Any, chunk: int) -> Tensor:
    """Losses at theta + mu * e_j for each j in coords, `chunk` perturbed vectors per call of
    `losses(thetas [P, d], batch) -> [P]`: at most `chunk` copies of theta exist at once."""
    coords = coords.to(device=theta.device, dtype=torch.long)
    out = []
    for start in range(0, coords.numel(), chunk):
        c = coords[start : start + chunk]
        thetas = theta.unsqueeze(0).repeat(c.numel(), 1)
        thetas[torch.arange(c.numel(), device=theta.device), c] += mu
        out.append(losses(thetas, batch))
    return torch.cat(out) if out else theta.new_empty(0)


class Oracle(ABC):
    """Loss values, nothing else. Subclasses set `space` and implement `losses`.

    The engine never calls `losses` / `coordinate_losses` directly: it calls `query` /
    `query_coordinates`, which charge the ledger first, time the call and reject
    non-finite values, so every loss value is counted exactly once.
    """

    space: ParamSpace
    name: str = "oracle"
    memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES

    @abstractmethod
    def losses(self, thetas: Tensor, batch: Any) -> Tensor:
        """Loss values for P parameter vectors ([P, d] -> [P]) on one batch. Values only."""

    def coordinate_losses(self, theta: Tensor, coords: Tensor, mu: float, batch: Any) -> Tensor:
        """Losses at theta + mu * e_j for each j in coords ([d], [K] -> [K]).

        The default builds the perturbed vectors in chunks bounded by `memory_cap_bytes`
        and calls `losses` once per chunk. Overrides must agree with it to fp tolerance.
        """
        return coordinate_losses_in_chunks(self.losses, theta, coords, mu, batch, self.chunk_size(theta))

    def base_loss(self, theta: Tensor, batch: Any) -> Tensor:
        """The loss at a step's unperturbed point ([d] -> [1]): the one query a plan makes at theta.

        The default is `losses(theta[None])`. An oracle that caches the unperturbed forward for its
        coordinate queries (feature reuse) overrides it; the override must agree with `losses` to fp
        tolerance. `losses` itself must not tell a base from a perturbation by the call's size: a
        perturbation can be alone in a call when the chunking changes, and its loss must not."""
        return self.losses(theta.unsqueeze(0), batch)

    def chunk_size(self, theta: Tensor) -> int:
        return max(1, self.memory_cap_bytes // max(1, theta.numel() * theta.element_size()))

    def on_step(self, theta: Tensor, batch: Any) -> None:
        """Called once per training step with the unperturbed parameters (e.g. to update
        running statistics exactly once). Costs no query by default."""

    def initial_theta(self) -> Tensor:
        """Starting point for oracles that own no torch module (zeros by default)."""
        return torch.zeros(self.space.dim)

    def example_batch(self) -> Any:
        """A small representative batch, used by `blackbox-zo check-oracle NAME`."""
        raise NotImplementedError(
            f"oracle {self.name!r} defines no example_batch(); implement it (or give the registered "
            "factory an example() returning (oracle, batch)) so check-oracle can run it"
        )

    # -- accounting wrappers (what the engine calls) --------------------------------

    @property
    def ledger(self) -> QueryLedger:
        ledger = self.__dict__.get("_ledger")
        if ledger is None:
            ledger = self.__dict__["_ledger"] = _JOB_LEDGER.get() or QueryLedger()
        return ledger

    @ledger.setter
    def ledger(self, value: QueryLedger) -> None:
        self.__dict__["_ledger"] = value

    def query(self, thetas: Tensor, batch: Any) -> Tensor:
        if thetas.dim() != 2 or thetas.shape[1] != self.space.dim:
            raise ValueError(f"{self.name}: thetas must be [P, {self.space.dim}], got {tuple(thetas.shape)}")
        return self._accounted(thetas.shape[0], lambda: self.losses(thetas, batch))

    def query_base(self, theta: Tensor, batch: Any) -> Tensor:
        return self._accounted(1, lambda: self.base_loss(theta, batch))

    def query_coordinates(self, theta: Tensor, coords: Tensor, mu: float, batch: Any) -> Tensor:
        return self._accounted(coords.numel(), lambda: self.coordinate_losses(theta, coords, mu, batch))

    def _accounted(self, n: int, call: Callable[[], Tensor]) -> Tensor:
        ledger = self.ledger
        ledger.charge(n)
        start = time.perf_counter()
        attempt = 0
        try:
            while True:
                try:
                    with torch.no_grad():
                        values = call()
                    break
                except TransientOracleError as exc:
                    if attempt >= ledger.max_retries:
                        raise OracleError(
                            f"oracle {self.name!r} failed {attempt + 1} time(s) in a row with a transient error "
                            f"(run.oracle_retries={ledger.max_retries}): {exc}") from exc
                    time.sleep(ledger.retry_delay(attempt))
                    attempt += 1
                    ledger.retried += n
        except (QueryBudgetExceeded, KeyboardInterrupt, OracleError):
            raise
        except Exception as exc:  # the oracle is a black box: wrap and name it
            raise OracleError(f"oracle {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        finally:
            ledger.busy_seconds += time.perf_counter() - start
        if values.shape != (n,):
            raise OracleError(f"oracle {self.name!r} returned shape {tuple(values.shape)}, expected ({n},)")
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise NonFiniteLossError(f"oracle {self.name!r} returned {bad} non-finite loss value(s) of {n}")
        return values


# ------------------------------------------------------------------------ registry


ORACLE_ENTRY_POINT_GROUP = ORACLES.group  # "blackbox_zo.oracles"


def register_oracle(name: str):
    """Class or factory decorator: `@register_oracle("my-sim-v1")` (a different object under a
    taken name is refused; see blackbox_zo/registry.py)."""
    return ORACLES.register(name)


def available_oracles() -> dict[str, Callable[..., Oracle]]:
    return ORACLES.available()


def make_oracle(name: str, **config: Any) -> Oracle:
    oracle = ORACLES.get(name)(**config)
    if not isinstance(oracle, Oracle):
        raise TypeError(f"oracle factory {name!r} returned {type(oracle).__name__}, not an Oracle")
    return oracle


# --------------------------------------------------------------------- conformance


@dataclass
class CheckResult:
    name: str
    passed: bool
    reason: str
    skipped: bool = False  # not run, because an earlier failure makes it meaningless (passed stays True)


@dataclass
class CheckReport:
    oracle: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    def __str__(self) -> str:
        lines = [f"check_oracle({self.oracle})"]
        for r in self.results:
            tag = "SKIP" if r.skipped else ("PASS" if r.passed else "FAIL")
            lines.append(f"  [{tag}] {r.name}: {r.reason}")
        lines.append("  OK" if self.ok else "  FAILED")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise AssertionError(str(self))


def check_oracle(
    oracle: Oracle,
    batch: Any,
    theta: Tensor | None = None,
    *,
    n_coords: int = 8,
    mu: float = 1e-2,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
    fd_mu: float | None = None,
) -> CheckReport:
    """Conformance checks every registered oracle passes (cf. gymnasium's `check_env`).

    With `fd_mu` (the estimator's finite-difference step), one more check: moving a
    coordinate by fd_mu changes the loss for at least one of the `n_coords` coordinates
    tried. If none does, every finite difference a CGE step computes is exactly zero
    (mu below the loss's resolution: a quantized or piecewise-constant loss).
    A non-deterministic oracle fails `deterministic` once; the checks that compare two
    evaluations (coordinate_losses against losses, the change at fd_mu) are then skipped.
    Queries made here are not charged to the oracle's ledger.
    """
    report = CheckReport(getattr(oracle, "name", type(oracle).__name__))
    add = lambda name, ok, why: report.results.append(CheckResult(name, bool(ok), why))  # noqa: E731

    space = getattr(oracle, "space", None)
    if not isinstance(space, ParamSpace):
        add("space", False, f"oracle.space must be a ParamSpace, got {type(space).__name__}")
        return report
    add("space", True, f"d = {space.dim} in {len(space)} block(s)")

    if theta is None:
        theta = oracle.initial_theta()
    gen = torch.Generator().manual_seed(seed)
    d = space.dim
    thetas = theta.unsqueeze(0) + 1e-2 * torch.randn(3, d, generator=gen).to(theta)
    thetas[0] = theta

    def call(fn):
        try:
            return fn(), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    with torch.no_grad():
        out, err = call(lambda: oracle.losses(thetas, batch))
    if err:
        add("losses runs under no_grad", False, err)
        return report
    shape_ok = isinstance(out, Tensor) and out.shape == (3,)
    add("shape", shape_ok, f"losses([3, {d}]) -> {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}, expected (3,)")
    if not shape_ok:
        return report
    add("dtype", out.is_floating_point(), f"dtype {out.dtype}")
    add("finite", bool(torch.isfinite(out).all()), f"values {out.tolist()}")

    with torch.no_grad():
        again, err = call(lambda: oracle.losses(thetas, batch))
    deterministic = False
    if err:
        add("deterministic", False, err)
    else:
        deterministic = torch.equal(out, again)
        add("deterministic", deterministic, "identical values for the same batch" if deterministic else
            f"max difference {float((out - again).abs().max()):.3g} between two calls on the same batch: the loss "
            "must be a function of (theta, batch); draw any noise from a seed carried in the batch (common random "
            "numbers), or finite differences measure the noise")

    with torch.enable_grad():
        graphed, err = call(lambda: oracle.losses(thetas.clone(), batch))
    if err:
        add("no autograd", False, f"fails with grad enabled: {err}")
    else:
        builds = graphed.requires_grad or graphed.grad_fn is not None
        add("no autograd", not builds, "builds an autograd graph (grad_fn set)" if builds else "no graph built")

    coords = torch.randperm(d, generator=gen)[: min(n_coords, d)]
    if not deterministic:
        why = "not checked: the oracle is not deterministic (see above)"
        report.results.append(CheckResult("coordinate_losses agrees with losses", True, why, skipped=True))
        if fd_mu is not None:
            report.results.append(CheckResult(f"loss changes at mu={fd_mu:g}", True, why, skipped=True))
        return report
    with torch.no_grad():
        fast, err = call(lambda: oracle.coordinate_losses(theta, coords, mu, batch))
        if err is None:
            ref_thetas = theta.unsqueeze(0).repeat(coords.numel(), 1)
            ref_thetas[torch.arange(coords.numel()), coords] += mu
            ref, err = call(lambda: oracle.losses(ref_thetas, batch))
    if err:
        add("coordinate_losses agrees with losses", False, err)
    elif fast.shape != ref.shape:
        add("coordinate_losses agrees with losses", False, f"shape {tuple(fast.shape)} vs {tuple(ref.shape)}")
    else:
        gap = float((fast - ref).abs().max())
        tol = atol + rtol * float(ref.abs().max())
        add("coordinate_losses agrees with losses", gap <= tol, f"max |difference| {gap:.3g} (tolerance {tol:.3g})")
    with torch.no_grad():
        own, err = call(lambda: oracle.base_loss(theta, batch))
        if err is None:
            ref, err = call(lambda: oracle.losses(theta.unsqueeze(0), batch))
    if err:
        add("base_loss agrees with losses", False, err)
    elif not isinstance(own, Tensor) or own.shape != (1,):
        add("base_loss agrees with losses", False, f"base_loss(theta) -> {tuple(own.shape) if isinstance(own, Tensor) else type(own).__name__}, expected (1,)")
    else:
        gap = float((own - ref).abs().max())
        tol = atol + rtol * float(ref.abs().max())
        add("base_loss agrees with losses", gap <= tol, f"|difference| {gap:.3g} (tolerance {tol:.3g})")
    if fd_mu is not None:
        with torch.no_grad():
            base, err = call(lambda: oracle.losses(theta.unsqueeze(0), batch))
            if err is None:
                moved = theta.unsqueeze(0).repeat(coords.numel(), 1)
                moved[torch.arange(coords.numel()), coords] += fd_mu
                shifted, err = call(lambda: oracle.losses(moved, batch))
        name = f"loss changes at mu={fd_mu:g}"
        if err:
            add(name, False, err)
        else:
            changed = int((shifted != base[0]).sum())
            add(name, changed > 0,
                f"{changed} of {coords.numel()} coordinates change the loss when moved by {fd_mu:g}" if changed else
                f"none of {coords.numel()} coordinates changes the loss when moved by {fd_mu:g}: every finite "
                "difference would be exactly 0 (mu is below the loss's resolution, e.g. a quantized or "
                "piecewise-constant loss); raise estimator.mu or use estimator=rge")
    return report
