"""Runnable tasks and experiments, registered by name and through entry points.

The engine never imports `problems/`: the CLI finds problems through the registries
`PROBLEMS` and `EXPERIMENTS` (blackbox_zo/registry.py), filled by `register_problem` /
`register_experiment` and by the entry-point groups `blackbox_zo.problems` /
`blackbox_zo.experiments` (this repository's own problems are declared there, exactly as a
third-party package would declare its own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .oracle import Oracle, available_oracles
from .registry import EXPERIMENTS, PROBLEMS, UnknownNameError

__all__ = [
    "BatchSource",
    "TensorBatches",
    "TrainingSetup",
    "Problem",
    "PROBLEMS",
    "EXPERIMENTS",
    "register_problem",
    "available_problems",
    "get_problem",
    "register_experiment",
    "available_experiments",
    "get_experiment",
    "ProblemSetupError",
]


class ProblemSetupError(RuntimeError):
    """A problem cannot be set up (its data is missing or malformed, a device is unavailable).
    The message is one line saying what was looked for and how to fix it; the CLI prints it."""


class BatchSource(Protocol):
    """Index-addressable batches, so a resumed run sees exactly the batches it would have."""

    def num_batches(self, epoch: int) -> int: ...

    def batch(self, epoch: int, index: int) -> Any: ...


class TensorBatches:
    """Shuffled mini-batches of in-memory tensors; the order of epoch e is a pure function of (seed, e)."""

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if not tensors:
            raise ValueError("TensorBatches needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors must have the same first dimension")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.n, self.batch_size = tensors, n, min(batch_size, n)
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self._perm_epoch: int | None = None
        self._perm: Tensor | None = None

    def num_batches(self, epoch: int) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def _order(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=gen)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, index: int):
        idx = self._order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        out = tuple(t[idx] for t in self.tensors)
        return out if len(out) > 1 else out[0]


@dataclass
class TrainingSetup:
    """What a problem hands the trainer."""

    oracle: Oracle
    train_batches: BatchSource
    module: Optional[nn.Module] = None  # whose parameters are theta; None: theta lives in a FlatParams holder
    evaluate: Optional[Callable[[nn.Module], dict[str, float]]] = None  # e.g. {"test_acc": 0.97}
    fo_loss: Optional[Callable[[nn.Module, Any], Tensor]] = None  # differentiable loss: FO reference only
    coord_sampler: Any = None  # set by sparsity (issue 3): .coords(epoch) -> Tensor | None, state_dict()
    extras: dict[str, Any] = field(default_factory=dict)
    # more summary.json entries, read at every stop (e.g. the images and requests an API was sent)
    summary: Optional[Callable[[], dict[str, Any]]] = None


class Problem(ABC):
    """A ready-to-run task: data, trainable module, oracle, default config, evaluation, report."""

    name: str = "problem"
    description: str = ""
    config_model: type[TrainConfig] = TrainConfig
    headline_metric: str = "test_acc"
    devices: tuple[str, ...] = ("cpu",)  # device types `setup` honours run.device with (see runtime.resolve_device)

    @abstractmethod
    def default_config(self) -> dict[str, Any]:
        """Defaults as a nested dict (validated by `config_model`)."""

    @abstractmethod
    def setup(self, config: TrainConfig) -> TrainingSetup: ...

    def report(self, run_dir: Path, summary: dict[str, Any]) -> None:
        """Optional extra artifacts (plots, tables) after training."""


PROBLEM_GROUP, EXPERIMENT_GROUP = PROBLEMS.group, EXPERIMENTS.group


def register_problem(name: str):
    """Class decorator: `@register_problem("my-task")` (a different object under a taken name is refused)."""
    return PROBLEMS.register(name)


def register_experiment(name: str):
    """Decorator for an experiment function `(argv: list[str]) -> int`."""
    return EXPERIMENTS.register(name)


def available_problems() -> dict[str, Any]:
    return PROBLEMS.available()


def available_experiments() -> dict[str, Callable[..., Any]]:
    return EXPERIMENTS.available()


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        known = available_problems()
        oracles = available_oracles()
        if name in oracles:  # a registered oracle with no problem of its own: train it directly
            from .oracle_problem import OracleProblem

            return OracleProblem(name)
        raise UnknownNameError(f"unknown problem or oracle {name!r}; problems: {', '.join(known) or '(none)'}; "
                               f"oracles: {', '.join(oracles) or '(none)'}")
    obj = PROBLEMS.get(name)
    problem = obj() if isinstance(obj, type) else obj
    if not isinstance(problem, Problem):
        raise TypeError(f"problem {name!r} is {type(problem).__name__}, not a Problem")
    return problem


def get_experiment(name: str) -> Callable[..., Any]:
    return EXPERIMENTS.get(name)
