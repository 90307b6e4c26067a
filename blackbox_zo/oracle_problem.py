"""Train any registered oracle directly: `blackbox-zo train ORACLE-NAME`.

A plug-in that only ships an oracle (entry-point group `blackbox_zo.oracles`) has no
data, module or evaluation of its own. `OracleProblem` supplies the minimum around it:

* theta starts at `oracle.initial_theta()` and lives in the trainer's `FlatParams`;
* every step uses the oracle's own `example_batch()` (the same batch each step: right
  for deterministic black boxes whose batch is None or fixed; an oracle whose batch
  must change from step to step needs a real `Problem`);
* evaluation (`eval_loss`) is the loss at the current theta on that batch (one query, phase `eval`);
* `--set oracle.options.KEY=VALUE` passes keyword arguments to the oracle's factory.

`get_problem(name)` falls back to this when `name` is a registered oracle and no
problem of that name exists, so `train`, `eval` and `--resume` work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from .config import Strict, TrainConfig
from .oracle import make_oracle
from .plan import QueryPlan, execute
from .problem import Problem, ProblemSetupError, TrainingSetup

__all__ = ["OracleSection", "OracleTrainConfig", "OracleProblem", "RepeatedBatch"]


class OracleSection(Strict):
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the oracle's factory")
    steps_per_epoch: int = Field(10, ge=1, description="training steps between evaluations")


class OracleTrainConfig(TrainConfig):
    oracle: OracleSection = OracleSection()


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
