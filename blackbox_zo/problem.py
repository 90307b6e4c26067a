"""Runnable tasks and experiments, registered by name and through entry points.

The engine never imports `problems/`: the CLI finds problems through the registries
`PROBLEMS` and `EXPERIMENTS` (blackbox_zo/registry.py), filled by `register_problem` /
`register_experiment` and by the entry-point groups `blackbox_zo.problems` /
`blackbox_zo.experiments` (this repository's own problems are declared there, exactly as a
third-party package would declare its own).

Any registered oracle can be trained directly (`blackbox-zo train ORACLE-NAME`): a plug-in
that ships only an oracle has no data, module or evaluation of its own, so `get_problem`
falls back to `OracleProblem`, which supplies the minimum around it:

* theta starts at `oracle.initial_theta()` and lives in the trainer's `FlatParams`;
* every step uses the oracle's own `example_batch()` (the same batch each step: right
  for deterministic black boxes whose batch is None or fixed; an oracle whose batch
  must change from step to step needs a real `Problem`);
* evaluation (`eval_loss`) is the loss at the current theta on that batch (one query, phase `eval`);
* `--set oracle.options.KEY=VALUE` passes keyword arguments to the oracle's factory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from .config import Strict, TrainConfig, resolve_config
from .oracle import Oracle, available_oracles, make_oracle
from .plan import QueryPlan, execute
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
    "OracleSection",
    "OracleTrainConfig",
    "OracleProblem",
    "RepeatedBatch",
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

    def with_batch_size(self, batch_size: int) -> "TensorBatches":
        """The same tensors, seed and order rule in batches of another size (a run's phase 2)."""
        return TensorBatches(*self.tensors, batch_size=batch_size, seed=self.seed, shuffle=self.shuffle,
                             drop_last=self.drop_last)

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
    coord_sampler: Any = None  # gradient sparsity: .coords(epoch) -> Tensor | None, state_dict()
    extras: dict[str, Any] = field(default_factory=dict)
    # more summary.json entries, read at every stop (e.g. the images and requests an API was sent)
    summary: Optional[Callable[[], dict[str, Any]]] = None


class Problem(ABC):
    """A ready-to-run task: data, trainable module, oracle, default config, evaluation, report.

    `config_model` declares the sections the problem uses: a `TrainConfig` subclass that adds
    `data` and `sparsity` (`blackbox_zo.config.SparsityField`) only if the problem honours
    them, and sections of its own; a setting outside them is refused, not ignored.
    """

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

    def resolve_config(self, file: str | Path | None = None, overrides: Sequence[str] = (),
                       base: dict[str, Any] | None = None) -> TrainConfig:
        """This problem's settings: its defaults (or `base`, e.g. a run's saved config.json) <- `file`
        (TOML/JSON) <- `overrides` (`key.path=value`). ConfigError (one line) names a setting this
        problem does not use or an invalid value."""
        defaults = self.default_config() if base is None else base
        return resolve_config(self.config_model, defaults, file, list(overrides), name=self.name)

    def report(self, run_dir: Path, summary: dict[str, Any]) -> None:
        """Optional extra artifacts (plots, tables) after training."""


# ----------------------------------------------------------------- a bare oracle as a problem


class OracleSection(Strict):
    """The `oracle` section of a run that trains a registered oracle directly."""

    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the oracle's factory")
    steps_per_epoch: int = Field(10, ge=1, description="training steps between evaluations")


class OracleTrainConfig(TrainConfig):
    """A bare oracle's settings: no data (its example batch every step), no sparsity (nothing to prune on)."""

    oracle: OracleSection = Field(default_factory=OracleSection, description="the oracle's factory options and "
                                  "the steps between evaluations")


class RepeatedBatch:
    """The same batch at every (epoch, index): a BatchSource for oracles without data."""

    def __init__(self, batch: Any, steps_per_epoch: int):
        self._batch, self.steps_per_epoch = batch, steps_per_epoch

    def num_batches(self, epoch: int) -> int:
        return self.steps_per_epoch

    def batch(self, epoch: int, index: int) -> Any:
        return self._batch


def _flat_theta(module: nn.Module) -> torch.Tensor:
    params = module.params_in_order() if hasattr(module, "params_in_order") else list(module.parameters())
    return torch.cat([p.detach().reshape(-1) for p in params])


class OracleProblem(Problem):
    """A registered oracle, trained by queries from its initial theta on its example batch."""

    config_model = OracleTrainConfig
    headline_metric = "eval_loss"

    def __init__(self, oracle_name: str):
        self.name = oracle_name
        self.description = f"the registered oracle {oracle_name!r}, trained directly"

    def default_config(self) -> dict[str, Any]:
        return {"problem": self.name, "schedule": {"name": "constant"}}

    def setup(self, config: OracleTrainConfig) -> TrainingSetup:
        options = config.oracle.options
        try:
            oracle = make_oracle(self.name, **options)
            batch = oracle.example_batch()
        except Exception as exc:  # the factory is third-party code: one line, naming the field
            raise ProblemSetupError(f"cannot build oracle {self.name!r} with oracle.options={options}: "
                                    f"{type(exc).__name__}: {exc}") from exc

        def evaluate(module: nn.Module) -> dict[str, float]:
            return {"eval_loss": float(execute(QueryPlan.at(_flat_theta(module).unsqueeze(0)), oracle, batch).plus[0])}

        return TrainingSetup(oracle=oracle, train_batches=RepeatedBatch(batch, config.oracle.steps_per_epoch),
                             module=None, evaluate=evaluate)


# ------------------------------------------------------------------------------ registries

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
