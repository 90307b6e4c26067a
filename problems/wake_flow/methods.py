"""Rollouts, the test-set evaluation and the NON baseline for the wake flow.

The four methods of DeepZero Fig. 6 (Um et al. 2020); the code is the generic
solver-in-the-loop one (`problems.sol.methods`), which works for any simulator:

* SRC: the low-fidelity solver alone (no corrector): `evaluate_mae(sim, None, ...)`.
* NON: the corrector trained first-order on pre-generated pairs (P_s(y_t), y_{t+1}),
  outside the simulation loop (`one_step_pairs`, `train_non`): the simulator never sees
  the corrector's output during training.
* FO-SOL: eq. (A3) with n unrolled steps, backpropagated through the differentiable PhiFlow
  torch backend: the trainer with `estimator=autograd` on the problem's `fo_loss`.
* ZO-SOL: eq. (A3) through `SolverInTheLoopOracle` by loss values only: the trainer with
  CGE and DeepZero gradient sparsity (`problems.wake_flow.WakeFlowProblem`).
"""

from __future__ import annotations

from torch import Tensor

from oracles.simulator import Simulator
from problems.sol import methods as sol_methods
from problems.sol.methods import evaluate_mae, mae_per_step, rollout, train_non

from .data import WakeData

__all__ = ["rollout", "mae_per_step", "evaluate_mae", "one_step_pairs", "train_non"]


def one_step_pairs(sim: Simulator, data: WakeData, max_batch: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """NON's training set: (P_s(y_t), y_{t+1}, Re) for every recorded training frame t < T."""
    return sol_methods.one_step_pairs(sim, data.train, data.train_re, max_batch=max_batch)
