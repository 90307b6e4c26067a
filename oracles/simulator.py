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

Any simulator with `step(state [B, ...], conditions [B]) -> state [B, ...]` plugs in
(`Simulator` protocol); the PhiFlow wake flow (`oracles.wake_flow`) is the first one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from blackbox_zo.oracle import Oracle, ParamSpace

__all__ = ["Simulator", "SolBatch", "SolverInTheLoopOracle", "unrolled_loss", "weighted_mse"]


@runtime_checkable
class Simulator(Protocol):
    """A batched time stepper. One batch element = one simulation (or one perturbed copy of one)."""

    @property
    def state_shape(self) -> tuple[int, ...]: ...

    def reset(self, state: Tensor) -> Tensor:
        """Validate a batch of start states [B, *state_shape] and return what `step` accepts."""

    def step(self, state: Tensor, conditions: Tensor) -> Tensor:
        """Advance every state by one time step; `conditions` [B] are per-simulation parameters."""


@dataclass
class SolBatch:
    """W training windows: start states, the next n reference states, per-window conditions."""

    start: Tensor  # [W, *state_shape]   reference state y_t (already on the simulator's grid)
    targets: Tensor  # [W, n, *state_shape]  y_{t+1} .. y_{t+n}
    conditions: Tensor  # [W]  e.g. the Reynolds number

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


def weighted_mse(diff: Tensor, weight: Tensor | None) -> Tensor:
    """sum(weight * diff^2) / (number of entries with weight != 0), per batch element: [B, ...] -> [B]."""
    sq = diff.pow(2)
    if weight is None:
        return sq.flatten(1).mean(1)
    return (sq * weight).flatten(1).sum(1) / torch.count_nonzero(weight)


def unrolled_loss(
    simulator: Simulator,
    correct: Callable[[Tensor, Tensor], Tensor] | None,
    start: Tensor,
    targets: Tensor,
    conditions: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    """Eq. (A3) per batch element: the sum over the n unrolled steps of the weighted MSE. [B]

    `correct(state, conditions)` returns the correction added after each solver step
    (None: no correction, the SRC loss). Differentiable if the simulator and `correct` are
    (FO-SOL); the oracle calls it under no_grad.
    """
    state = simulator.reset(start)
    total = start.new_zeros(start.shape[0])
    for i in range(targets.shape[1]):
        state = simulator.step(state, conditions)
        if correct is not None:
            state = state + correct(state, conditions)
        total = total + weighted_mse(state - targets[:, i], weight)
    return total


class SolverInTheLoopOracle(Oracle):
    """Loss (A3) of a corrector network, as a value-only function of its parameters.

    `losses(thetas [P, d], batch: SolBatch) -> [P]`: the mean over the W windows of the
    n-step unrolled loss. The corrector is `corrector(state [B, ...], conditions [B]) ->
    correction [B, ...]`; its buffers (e.g. normalisation constants) are fixed.
    `max_batch` bounds the states simulated at once (P*W per chunk).
    """

    name = "solver-in-the-loop-v1"

    def __init__(self, simulator: Simulator, corrector: nn.Module, *, weight: Tensor | None = None,
                 max_batch: int = 128):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if weight is not None and tuple(weight.shape) != tuple(simulator.state_shape):
            raise ValueError(f"weight must have the state shape {tuple(simulator.state_shape)}, got {tuple(weight.shape)}")
        self.simulator = simulator
        self.corrector = corrector
        self.space = ParamSpace.from_module(corrector)
        self.weight = weight
        self.max_batch = int(max_batch)

    def initial_theta(self) -> Tensor:
        return self.space.flatten_module(self.corrector)

    def losses(self, thetas: Tensor, batch: SolBatch) -> Tensor:
        per_chunk = max(1, self.max_batch // batch.windows)  # parameter vectors per batched simulation
        with torch.no_grad():
            return torch.cat([self._losses_chunk(thetas[i : i + per_chunk], batch)
                              for i in range(0, thetas.shape[0], per_chunk)])

    def _losses_chunk(self, thetas: Tensor, batch: SolBatch) -> Tensor:
        p, w = thetas.shape[0], batch.windows
        views = self.space.views(thetas)  # {name: [P, *shape]}
        buffers = dict(self.corrector.named_buffers())

        def one(params: dict[str, Tensor], state: Tensor, cond: Tensor) -> Tensor:
            return functional_call(self.corrector, {**buffers, **params}, (state, cond))

        batched = vmap(one)

        def correct(state: Tensor, cond: Tensor) -> Tensor:
            out = batched(views, state.reshape(p, w, *state.shape[1:]), cond.reshape(p, w))
            return out.reshape(state.shape)

        # State b = k * W + j holds window j under parameter vector k.
        rep = lambda t: t.unsqueeze(0).expand(p, *t.shape).reshape(p * w, *t.shape[1:])  # noqa: E731
        weight = None if self.weight is None else self.weight.to(batch.start)
        per_window = unrolled_loss(self.simulator, correct, rep(batch.start), rep(batch.targets),
                                   rep(batch.conditions), weight)
        return per_window.view(p, w).mean(1)

    def example_batch(self) -> SolBatch:
        batch = getattr(self, "example", None)
        if batch is None:
            raise NotImplementedError("this SolverInTheLoopOracle was built without an example batch")
        return batch
