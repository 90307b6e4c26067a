"""Solver-in-the-loop as an oracle: a learned corrector trained through a black-box simulator.

DeepZero Appx. H, eq. (A3)::

    min_theta  sum_t sum_{i=0}^{n-1} || P_s(s~_{t+i}) + C_theta(P_s(s~_{t+i})) - y_{t+i+1} ||^2,
    s~_{t+i+1} = P_s(s~_{t+i}) + C_theta(P_s(s~_{t+i})),   s~_t = y_t

P_s is the (low-fidelity) simulator, C_theta the corrector, y the reference (high-fidelity)
trajectory, n the number of unrolled steps. The squared norm is taken with a per-entry
weight (e.g. 1/std^2 per velocity component, 0 on padding, as the reference code scales
its loss) and divided by the number of weighted entries; the sum over i is kept, the sum
over windows t becomes a mean over the W windows of a batch.

The oracle evaluates this loss for P parameter vectors at once: the P perturbed correctors
of one step and the W windows of the batch form ONE batched simulation of P*W states
(chunked by `max_batch`); the corrector runs over the P parameter sets with
`torch.func.vmap`. On this path the simulator is only ever called under `no_grad`
(values only). `unrolled_loss` with a live module is the differentiable twin FO-SOL uses.

Any simulator with `step(state [B, ...], conditions [B] or [B, C]) -> state [B, ...]` plugs
in (`Simulator` protocol, checked by `check_simulator`); simulators are registered by name in
`blackbox_zo.registry.SIMULATORS` (entry-point group `blackbox_zo.simulators`). The PhiFlow
wake flow (`oracles.wake_flow`) and a NumPy shock-capturing Burgers solver
(`oracles.burgers`, not differentiable) are two.

**Diverging rollouts** (docs/sol.md, docs/reliability.md). A perturbed corrector can blow a
simulation up. With a `step_cap` the oracle turns that into a loss value instead of a NaN:
an unrolled step whose weighted MSE is non-finite or above `step_cap` counts `step_cap`, and
so does every later step of that rollout (its state is replaced by the reference state, so
the simulator is never fed garbage and the other members of the batch are unaffected). A
simulator may also raise `SimulationDiverged` for a whole batch; the oracle then splits the
batch until it knows which members diverged. Every query whose rollouts diverged is counted
(`diverged_queries`). The capped loss is at most n * step_cap per window.
"""

from __future__ import annotations

import math
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from blackbox_zo.oracle import CheckReport, CheckResult, Oracle, ParamSpace
from blackbox_zo.registry import SIMULATORS

__all__ = ["Simulator", "SimulationDiverged", "ReferenceRuns", "SolBatch", "SolverInTheLoopOracle", "unrolled_loss",
           "weighted_mse", "is_differentiable", "check_simulator", "check_registered_simulator",
           "make_simulator", "SimulatorReport"]


@runtime_checkable
class Simulator(Protocol):
    """A batched time stepper. One batch element = one simulation (or one perturbed copy of one).

    Required: `state_shape`, `reset`, `step`. Optional attributes a simulator may declare
    (read with `getattr`, so a minimal simulator needs none of them):

    * ``differentiable: bool`` -- `step` is differentiable in torch (FO-SOL can backpropagate
      through it). Absent means False: FO-SOL is refused.
    * ``mask: Tensor [*state_shape]`` -- 1 on real entries, 0 on padding: the loss ignores
      the padding and the corrector never writes there.
    * ``padding: str`` -- how a convolutional corrector pads: "zeros" (default), "circular"
      (periodic domains) or "replicate".
    * ``conservative: bool`` -- the step keeps each channel's total over the valid entries
      (finite volumes on a periodic domain): the corrector's output is then made zero-mean
      per channel, so it cannot add a drift (problems/sol/corrector.py).
    * ``reference_data(progress: bool = True) -> ReferenceRuns`` -- the simulator's
      high-fidelity twin: reference trajectories on this simulator's grid.
    * ``example_states(batch: int) -> (states, conditions)`` -- plausible inputs for
      `check_simulator` (default: standard normal states, conditions 1).
    * ``cache_key() -> str`` -- everything (besides the registered options) that changes
      the twin's data, e.g. a solver's version; part of the data cache key.

    A state that blows up should come back non-finite (or raise `SimulationDiverged` for
    the batch); the oracle turns it into a capped loss.
    """

    @property
    def state_shape(self) -> tuple[int, ...]: ...

    def reset(self, state: Tensor) -> Tensor:
        """Validate a batch of start states [B, *state_shape] and return what `step` accepts."""

    def step(self, state: Tensor, conditions: Tensor) -> Tensor:
        """Advance every state by one time step; `conditions` [B] (or [B, C]) are per-simulation parameters."""


class SimulationDiverged(RuntimeError):
    """Raised by a simulator that cannot advance a batch (a CFL violation, a solver that did not
    converge, an overflow). The oracle finds which members diverged by splitting the batch."""


def is_differentiable(simulator: Any) -> bool:
    """What the simulator declares (`differentiable`, default False)."""
    return bool(getattr(simulator, "differentiable", False))


@dataclass
class ReferenceRuns:
    """Reference trajectories on the simulator's grid: what `reference_data()` returns and what a
    `.npz` reference file holds (see problems/sol/data.py for the file format).

    frames [R, T+1, *state_shape]; conditions [R] or [R, C]; test [R] bool (True: held out).
    """

    frames: Tensor
    conditions: Tensor
    test: Tensor
    description: str = ""

    def __post_init__(self):
        r = self.frames.shape[0]
        if self.frames.dim() < 3:
            raise ValueError(f"frames must be [runs, T+1, *state], got shape {tuple(self.frames.shape)}")
        if self.frames.shape[1] < 2:
            raise ValueError(f"frames need at least 2 time steps per run, got {self.frames.shape[1]}")
        if self.conditions.dim() not in (1, 2) or self.conditions.shape[0] != r:
            raise ValueError(f"conditions must be [runs] or [runs, C] with runs = {r}, got {tuple(self.conditions.shape)}")
        if self.test.dtype != torch.bool or tuple(self.test.shape) != (r,):
            raise ValueError(f"test must be a bool vector of length {r}, got {self.test.dtype} {tuple(self.test.shape)}")
        if not bool(self.test.any()) or bool(self.test.all()):
            raise ValueError(f"need at least one training run and one test run, got {int(self.test.sum())} test of {r}")
        if not self.frames.is_floating_point() or not bool(torch.isfinite(self.frames).all()):
            raise ValueError("frames must be finite floating-point values")
        if not bool(torch.isfinite(self.conditions).all()):
            raise ValueError("conditions must be finite")

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape[2:])

    def split(self, test: bool) -> tuple[Tensor, Tensor]:
        """(frames, conditions) of the test runs (test=True) or of the training runs."""
        pick = self.test if test else ~self.test
        return self.frames[pick], self.conditions[pick]


@dataclass
class SolBatch:
    """W training windows: start states, the next n reference states, per-window conditions."""

    start: Tensor  # [W, *state_shape]   reference state y_t (already on the simulator's grid)
    targets: Tensor  # [W, n, *state_shape]  y_{t+1} .. y_{t+n}
    conditions: Tensor  # [W] or [W, C]  e.g. the Reynolds number

    def __post_init__(self):
        w = self.start.shape[0]
        if self.targets.shape[0] != w or self.conditions.shape[0] != w:
            raise ValueError(f"SolBatch: start, targets and conditions need the same first dimension, got "
                             f"{self.start.shape[0]}, {self.targets.shape[0]}, {self.conditions.shape[0]}")
        if self.targets.dim() != self.start.dim() + 1 or tuple(self.targets.shape[2:]) != tuple(self.start.shape[1:]):
            raise ValueError(f"SolBatch: targets {tuple(self.targets.shape)} do not match start {tuple(self.start.shape)}")
        if self.targets.shape[1] < 1:
            raise ValueError("SolBatch: need at least one target step (n >= 1)")

    @property
    def windows(self) -> int:
        return self.start.shape[0]

    @property
    def unroll(self) -> int:
        return self.targets.shape[1]

    def select(self, index: slice) -> "SolBatch":
        return SolBatch(self.start[index], self.targets[index], self.conditions[index])


def weighted_mse(diff: Tensor, weight: Tensor | None) -> Tensor:
    """sum(weight * diff^2) / (number of entries with weight != 0), per batch element: [B, ...] -> [B]."""
    sq = diff.pow(2)
    if weight is None:
        return sq.flatten(1).mean(1)
    return (sq * weight).flatten(1).sum(1) / torch.count_nonzero(weight)


def _unroll(simulator: Simulator, correct: Callable[[Tensor, Tensor], Tensor] | None, start: Tensor, targets: Tensor,
            conditions: Tensor, weight: Tensor | None, step_cap: float | None) -> tuple[Tensor, Tensor]:
    """(eq. (A3) per element [B], diverged [B] bool). See `unrolled_loss`."""
    state = simulator.reset(start)
    b, n = start.shape[0], targets.shape[1]
    total = start.new_zeros(b)
    alive = torch.ones(b, dtype=torch.bool, device=start.device)
    for i in range(n):
        try:
            state = simulator.step(state, conditions)
        except SimulationDiverged:
            if step_cap is None or b > 1:
                raise  # the oracle splits the batch to find the member that diverged
            return total + (n - i) * step_cap, torch.ones_like(alive)
        if correct is not None:
            state = state + correct(state, conditions)
        step_loss = weighted_mse(state - targets[:, i], weight)
        if step_cap is not None:
            alive = alive & torch.isfinite(step_loss) & (step_loss <= step_cap)
            step_loss = torch.where(alive, step_loss, torch.full_like(step_loss, step_cap))
            if not bool(alive.all()):  # feed the simulator a sane state; the loss of this rollout is fixed now
                keep = alive.view(b, *([1] * (state.dim() - 1)))
                state = torch.where(keep, state, targets[:, i].to(state))
        total = total + step_loss
    return total, ~alive


def unrolled_loss(
    simulator: Simulator,
    correct: Callable[[Tensor, Tensor], Tensor] | None,
    start: Tensor,
    targets: Tensor,
    conditions: Tensor,
    weight: Tensor | None = None,
    step_cap: float | None = None,
) -> Tensor:
    """Eq. (A3) per batch element: the sum over the n unrolled steps of the weighted MSE. [B]

    `correct(state, conditions)` returns the correction added after each solver step
    (None: no correction, the SRC loss). Differentiable if the simulator and `correct` are
    (FO-SOL); the oracle calls it under no_grad. With `step_cap`, a step whose loss is
    non-finite or above the cap counts `step_cap`, and so does every later step of that
    rollout (module docstring).
    """
    return _unroll(simulator, correct, start, targets, conditions, weight, step_cap)[0]


class SolverInTheLoopOracle(Oracle):
    """Loss (A3) of a corrector network, as a value-only function of its parameters.

    `losses(thetas [P, d], batch: SolBatch) -> [P]`: the mean over the W windows of the
    n-step unrolled loss. The corrector is `corrector(state [B, ...], conditions) ->
    correction [B, ...]`; its buffers (e.g. normalisation constants) are fixed.
    `max_batch` bounds the states simulated at once (P*W per chunk).

    `step_cap` (None: off) maps a diverging rollout to a capped loss (module docstring);
    `on_divergence="nan"` instead returns NaN for such a query, which the engine's
    `run.nan_policy` then handles (stop the run, or skip the whole step).
    `stats()` / `state_dict()` carry the count of queries with a diverged rollout.
    """

    name = "solver-in-the-loop-v1"

    def __init__(self, simulator: Simulator, corrector: nn.Module, *, weight: Tensor | None = None,
                 max_batch: int = 128, step_cap: float | None = None,
                 on_divergence: Literal["cap", "nan"] = "cap"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if weight is not None and tuple(weight.shape) != tuple(simulator.state_shape):
            raise ValueError(f"weight must have the state shape {tuple(simulator.state_shape)}, got {tuple(weight.shape)}")
        if step_cap is not None and not (math.isfinite(step_cap) and step_cap > 0):
            raise ValueError(f"step_cap must be a finite number > 0, got {step_cap}")
        if on_divergence not in ("cap", "nan"):
            raise ValueError(f"on_divergence must be 'cap' or 'nan', got {on_divergence!r}")
        self.simulator = simulator
        self.corrector = corrector
        self.space = ParamSpace.from_module(corrector)
        self.weight = weight
        self.max_batch = int(max_batch)
        self.step_cap = None if step_cap is None else float(step_cap)
        self.on_divergence = on_divergence
        self.diverged_queries = 0  # queries (parameter vectors) with at least one diverged rollout
        self.batch_splits = 0  # batches split to isolate a SimulationDiverged

    def initial_theta(self) -> Tensor:
        return self.space.flatten_module(self.corrector)

    def losses(self, thetas: Tensor, batch: SolBatch) -> Tensor:
        per_chunk = max(1, self.max_batch // batch.windows)  # parameter vectors per batched simulation
        with torch.no_grad():
            parts = [self._per_window(thetas[i : i + per_chunk], batch)
                     for i in range(0, thetas.shape[0], per_chunk)]
        per_window = torch.cat([p[0] for p in parts])  # [P, W]
        diverged = torch.cat([p[1] for p in parts]).any(1)  # [P]
        self.diverged_queries += int(diverged.sum())
        out = per_window.mean(1)
        if self.on_divergence == "nan" and bool(diverged.any()):
            out = torch.where(diverged, torch.full_like(out, float("nan")), out)
        return out

    def _per_window(self, thetas: Tensor, batch: SolBatch) -> tuple[Tensor, Tensor]:
        """([P, W] losses, [P, W] diverged) of one chunk; splits it on SimulationDiverged."""
        try:
            return self._simulate(thetas, batch)
        except SimulationDiverged:
            if self.step_cap is None:
                raise
            self.batch_splits += 1
            p, w = thetas.shape[0], batch.windows
            if p > 1:
                a, b = self._per_window(thetas[: p // 2], batch), self._per_window(thetas[p // 2 :], batch)
                return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
            a = self._per_window(thetas, batch.select(slice(0, w // 2)))  # p == 1: w > 1 (w == 1 never raises)
            b = self._per_window(thetas, batch.select(slice(w // 2, w)))
            return torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)

    def _simulate(self, thetas: Tensor, batch: SolBatch) -> tuple[Tensor, Tensor]:
        p, w = thetas.shape[0], batch.windows
        views = self.space.views(thetas)  # {name: [P, *shape]}
        buffers = dict(self.corrector.named_buffers())

        def one(params: dict[str, Tensor], state: Tensor, cond: Tensor) -> Tensor:
            return functional_call(self.corrector, {**buffers, **params}, (state, cond))

        batched = vmap(one)

        def correct(state: Tensor, cond: Tensor) -> Tensor:
            out = batched(views, state.reshape(p, w, *state.shape[1:]), cond.reshape(p, w, *cond.shape[1:]))
            return out.reshape(state.shape)

        # State b = k * W + j holds window j under parameter vector k.
        rep = lambda t: t.unsqueeze(0).expand(p, *t.shape).reshape(p * w, *t.shape[1:])  # noqa: E731
        weight = None if self.weight is None else self.weight.to(batch.start)
        per_window, diverged = _unroll(self.simulator, correct, rep(batch.start), rep(batch.targets),
                                       rep(batch.conditions), weight, self.step_cap)
        return per_window.view(p, w), diverged.view(p, w)

    # -- what the trainer logs and checkpoints (blackbox_zo.trainer: oracle stats) --------

    def stats(self) -> dict[str, int]:
        return {"diverged_queries": self.diverged_queries}

    def state_dict(self) -> dict[str, Any]:
        return {"diverged_queries": self.diverged_queries, "batch_splits": self.batch_splits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.diverged_queries = int(state.get("diverged_queries", 0))
        self.batch_splits = int(state.get("batch_splits", 0))

    def example_batch(self) -> SolBatch:
        batch = getattr(self, "example", None)
        if batch is None:
            raise NotImplementedError("this SolverInTheLoopOracle was built without an example batch")
        return batch


# ------------------------------------------------------------------ the simulator registry


def make_simulator(name: str, **options: Any) -> Simulator:
    """The simulator registered as `name` (blackbox_zo.registry.SIMULATORS), built with `options`.

    Unknown option names are refused before the factory runs, with the names it accepts.
    """
    factory = SIMULATORS.get(name)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C extension: let the call complain
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        allowed = [k for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"simulator {name!r} has no option(s) {', '.join(unknown)}; "
                            f"its options: {', '.join(allowed) or '(none)'}")
    sim = factory(**options)
    missing = [a for a in ("state_shape", "reset", "step") if not hasattr(sim, a)]
    if missing:
        raise TypeError(f"simulator {name!r} built a {type(sim).__name__}, which lacks {', '.join(missing)} "
                        "(the Simulator protocol: oracles/simulator.py)")
    return sim


# ------------------------------------------------------------------------ conformance


class SimulatorReport(CheckReport):
    """`CheckReport` of `check_simulator` (printed as check_simulator(NAME))."""

    def __str__(self) -> str:
        text = super().__str__()
        return "check_simulator" + text[len("check_oracle"):]


def _example_inputs(sim: Simulator, batch: int, seed: int) -> tuple[Tensor, Tensor, str]:
    example = getattr(sim, "example_states", None)
    if callable(example):
        states, conditions = example(batch)
        return states, conditions, "the simulator's example_states()"
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *sim.state_shape, generator=gen), torch.ones(batch), "standard normal states, conditions 1"


def check_simulator(sim: Simulator, *, batch: int = 3, rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0,
                    name: str | None = None) -> CheckReport:
    """Conformance checks for a `Simulator` (cf. `check_oracle`; gymnasium's `check_env`).

    shapes (reset and step keep [B, *state_shape], a wrong shape is refused), finite output,
    determinism, inputs left untouched, batch independence (element b of a batched step
    equals a step of b alone, and reversing the batch reverses the output), and what it
    declares: `conservative` (each channel's total is kept by a step), `differentiable` (when True, the step must backpropagate and agree with a
    central difference along a random direction to 5%).
    """
    report = SimulatorReport(name or getattr(sim, "name", type(sim).__name__))
    add = lambda n, ok, why: report.results.append(CheckResult(n, bool(ok), why))  # noqa: E731

    def call(fn):
        try:
            return fn(), None
        except Exception as exc:  # third-party code: report, never raise
            return None, f"{type(exc).__name__}: {exc}"

    shape = getattr(sim, "state_shape", None)
    ok = isinstance(shape, tuple) and len(shape) >= 1 and all(isinstance(s, int) and s >= 1 for s in shape)
    add("state_shape", ok, f"{shape}" if ok else f"state_shape must be a tuple of positive ints, got {shape!r}")
    if not ok:
        return report
    (states, conditions, source), err = call(lambda: _example_inputs(sim, batch, seed))
    if err:
        add("example states", False, err)
        return report
    expected = (batch, *shape)
    if tuple(states.shape) != expected or conditions.shape[0] != batch:
        add("example states", False, f"{source} gave states {tuple(states.shape)} and conditions "
            f"{tuple(conditions.shape)}, expected states {expected} and {batch} conditions")
        return report
    with torch.no_grad():
        start, err = call(lambda: sim.reset(states.clone()))
        if err is None:
            add("reset", tuple(start.shape) == expected, f"reset([{batch}, ...]) -> {tuple(start.shape)}")
            wrong, err_wrong = call(lambda: sim.reset(torch.zeros(batch, *shape, 2)))
            add("reset refuses a wrong shape", err_wrong is not None,
                f"raised {err_wrong}" if err_wrong else f"accepted a state of shape {(batch, *shape, 2)}")
        else:
            add("reset", False, err)
            return report
        before = start.clone()
        out, err = call(lambda: sim.step(start, conditions))
        if err:
            add("step", False, err)
            return report
        shape_ok = isinstance(out, Tensor) and tuple(out.shape) == expected and out.dtype == start.dtype
        add("step shape", shape_ok, f"step -> {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__} "
            f"{getattr(out, 'dtype', '')}, expected {expected} {start.dtype}")
        if not shape_ok:
            return report
        add("finite", bool(torch.isfinite(out).all()), f"{source}: all next states finite"
            if bool(torch.isfinite(out).all()) else f"{source}: step returned non-finite values")
        add("inputs untouched", torch.equal(start, before), "step does not modify its input state"
            if torch.equal(start, before) else "step modified its input state in place")
        again, err = call(lambda: sim.step(start.clone(), conditions))
        det = err is None and torch.equal(out, again)
        add("deterministic", det, "identical next states from the same input" if det else
            (err or f"max difference {float((out - again).abs().max()):.3g} between two calls"))
        scale = float(out.abs().max()) or 1.0
        tol = atol * scale + rtol * scale
        alone, err = call(lambda: torch.cat([sim.step(start[i : i + 1].clone(), conditions[i : i + 1])
                                             for i in range(batch)]))
        if err:
            add("batch independence", False, f"a batch of one fails: {err}")
        else:
            gap = float((alone - out).abs().max())
            rev, err = call(lambda: sim.step(start.flip(0).clone(), conditions.flip(0)))
            gap_rev = float("inf") if err else float((rev.flip(0) - out).abs().max())
            add("batch independence", gap <= tol and gap_rev <= tol,
                f"element b of a batched step vs a step of b alone: max |difference| {gap:.3g}; reversed batch: "
                f"{gap_rev:.3g} (tolerance {tol:.3g})")
    if getattr(sim, "conservative", False):
        m = getattr(sim, "mask", None)
        m = torch.ones(shape) if m is None else m.to(start)
        reduce = tuple(range(2, start.dim()))
        total_in, total_out = (start * m).sum(reduce), (out * m).sum(reduce)
        gap = float((total_out - total_in).abs().max())
        tol = 1e-5 * max(float((start.abs() * m).sum(reduce).max()), 1.0)
        add("conservative", gap <= tol, f"declares conservative=True: each channel's total changes by at most "
            f"{gap:.3g} in one step (tolerance {tol:.3g})")
    declared = is_differentiable(sim)
    if not declared:
        report.results.append(CheckResult("differentiable", True, "declares differentiable=False: FO-SOL is "
                                          "refused; ZO-SOL trains through it by loss values", skipped=True))
        return report
    report.results.append(_check_gradient(sim, start, conditions, seed))
    return report


def _check_gradient(sim: Simulator, start: Tensor, conditions: Tensor, seed: int) -> CheckResult:
    gen = torch.Generator().manual_seed(seed + 1)
    x = start.detach().clone().requires_grad_(True)
    v = torch.randn(start.shape, generator=gen).to(start)
    w = torch.randn(start.shape, generator=gen).to(start)
    try:
        with torch.enable_grad():
            (sim.step(x, conditions) * w).sum().backward()
        grad = float((x.grad * v).sum())
        eps = 1e-2 * float(start.abs().max() or 1.0) / float(v.abs().max())
        with torch.no_grad():
            fd = float(((sim.step(start + eps * v, conditions) - sim.step(start - eps * v, conditions)) * w).sum()) / (2 * eps)
    except Exception as exc:  # noqa: BLE001
        return CheckResult("differentiable", False, f"declares differentiable=True but backward fails: "
                           f"{type(exc).__name__}: {exc}")
    ok = math.isfinite(grad) and abs(grad - fd) <= 0.05 * max(abs(fd), 1e-12)
    return CheckResult("differentiable", ok, f"declares differentiable=True: directional derivative {grad:.5g} by "
                       f"backprop vs {fd:.5g} by central difference" + ("" if ok else " (more than 5% apart)"))


def check_registered_simulator(name: str, options: dict[str, Any] | None = None) -> CheckReport:
    """`blackbox-zo check-simulator NAME`: build the registered simulator and check it."""
    options = dict(options or {})
    try:
        sim = make_simulator(name, **options)
    except Exception as exc:  # third-party code: one result line, naming what was tried
        report = SimulatorReport(name)
        report.results.append(CheckResult(f"construct{f' with {options}' if options else ''}", False,
                                          f"{type(exc).__name__}: {exc}"))
        return report
    return check_simulator(sim, name=name)
