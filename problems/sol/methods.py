"""Rollouts, the test-set evaluation and the NON baseline, for any simulator.

The four methods of DeepZero Fig. 6 (Um et al. 2020):

* SRC: the low-fidelity solver alone (no corrector): `evaluate_mae(sim, None, ...)`.
* NON: the corrector trained first-order on pre-generated pairs (P_s(y_t), y_{t+1}),
  outside the simulation loop (`one_step_pairs`, `train_non`): the simulator never sees
  the corrector's output during training, so NON runs with any simulator, differentiable
  or not.
* FO-SOL: eq. (A3) with n unrolled steps, backpropagated through the simulator (only for a
  simulator that declares itself differentiable): the trainer with `estimator=autograd`.
* ZO-SOL: eq. (A3) through `SolverInTheLoopOracle` by loss values only: the trainer with CGE.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oracles.simulator import Simulator, weighted_mse

__all__ = ["rollout", "mae_per_step", "evaluate_mae", "one_step_pairs", "train_non", "warm_start_non"]


def rollout(sim: Simulator, corrector: nn.Module | None, start: Tensor, conditions: Tensor, steps: int,
            max_batch: int = 128) -> Tensor:
    """Corrected (or, with corrector=None, source) low-fidelity trajectory: [B, steps+1, ...].

    A state that blows up stays non-finite from there on (the evaluation reports it as such)."""
    outs = []
    with torch.no_grad():
        for i in range(0, start.shape[0], max_batch):
            s, cond = sim.reset(start[i : i + max_batch]), conditions[i : i + max_batch]
            frames = [s]
            for _ in range(steps):
                s = sim.step(s, cond)
                if corrector is not None:
                    s = s + corrector(s, cond)
                frames.append(s)
            outs.append(torch.stack(frames, 1))
    return torch.cat(outs)


def mae_per_step(traj: Tensor, frames: Tensor, mask: Tensor | None) -> Tensor:
    """Mean absolute error over the valid entries at each step 1..S: [R, S]."""
    steps = traj.shape[1] - 1
    err = (traj[:, 1:] - frames[:, 1 : steps + 1]).abs()
    if mask is None:
        return err.flatten(2).mean(2)
    return (err * mask).flatten(2).sum(2) / mask.sum()


def evaluate_mae(sim: Simulator, corrector: nn.Module | None, frames: Tensor, conditions: Tensor,
                 mask: Tensor | None, steps: int | None = None) -> tuple[Tensor, Tensor]:
    """The paper's test error: MAE against the reference per run, averaged over time steps.

    Every run starts from its reference frame 0 and is advanced `steps` steps (default: all
    recorded); the absolute error over the valid entries is averaged over entries and over
    steps 1..steps. Returns (MAE per run [R], the rolled-out trajectories [R, steps+1, ...]).
    A run that diverged has a non-finite MAE.
    """
    steps = frames.shape[1] - 1 if steps is None else min(int(steps), frames.shape[1] - 1)
    if steps < 1:
        raise ValueError(f"need at least one evaluation step, got {steps}")
    traj = rollout(sim, corrector, frames[:, 0], conditions, steps)
    return mae_per_step(traj, frames, mask).mean(1), traj


def one_step_pairs(sim: Simulator, frames: Tensor, conditions: Tensor, max_batch: int = 128
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """NON's training set: (P_s(y_t), y_{t+1}, condition) for every recorded training frame t < T."""
    r, t1 = frames.shape[:2]
    inputs = frames[:, :-1].reshape(r * (t1 - 1), *frames.shape[2:])
    targets = frames[:, 1:].reshape(r * (t1 - 1), *frames.shape[2:])
    cond = conditions[:, None].expand(r, t1 - 1, *conditions.shape[1:]).reshape(r * (t1 - 1), *conditions.shape[1:])
    with torch.no_grad():
        stepped = torch.cat([sim.step(sim.reset(inputs[i : i + max_batch]), cond[i : i + max_batch])
                             for i in range(0, inputs.shape[0], max_batch)])
    return stepped, targets, cond


def train_non(corrector: nn.Module, pairs: tuple[Tensor, Tensor, Tensor], weight: Tensor | None, *, steps: int,
              lr: float, batch_size: int = 32, seed: int = 0, log_every: int = 50, progress: bool = True
              ) -> list[dict[str, Any]]:
    """NON: first-order training on one-step pairs, outside the loop (Adam).

    The loss is the n = 1 case of eq. (A3) with the simulator output precomputed: the same
    weighted MSE the solver-in-the-loop methods use, so only the training regime differs.
    """
    if steps < 0 or not lr > 0 or batch_size < 1:
        raise ValueError(f"NON needs steps >= 0, lr > 0, batch_size >= 1; got {steps}, {lr}, {batch_size}")
    stepped, targets, cond = pairs
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(corrector.parameters(), lr=lr)
    log, start = [], time.perf_counter()
    for k in tqdm(range(steps), desc="NON (first-order, one-step pairs)", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(0, stepped.shape[0], (min(batch_size, stepped.shape[0]),), generator=gen)
        s = stepped[idx]
        loss = weighted_mse(s + corrector(s, cond[idx]) - targets[idx], weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k % log_every == 0 or k == steps - 1:
            log.append({"step": k + 1, "loss": loss.item(), "wall_s": round(time.perf_counter() - start, 3)})
    return log


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def warm_start_non(corrector: nn.Module, sim: Simulator, frames: Tensor, conditions: Tensor, weight: Tensor | None,
                   *, steps: int, lr: float, batch_size: int, seed: int, max_batch: int = 128, progress: bool = True
                   ) -> dict[str, Any]:
    """`sol.warm_start=non`: train `corrector` in place exactly as the NON method does (`one_step_pairs`
    on the training runs, then `train_non` with the same seed), before a solver-in-the-loop run.

    The simulator is called by value only, on the recorded reference frames (one step each, no corrector
    in the loop), and never differentiated: what a user of a black-box solver can do before spending
    queries. Returns its costs for summary.json: the solver steps of the pair generation (these are
    not oracle queries, and `run.query_budget` does not count them), the Adam steps and the CPU and
    wall seconds of both parts.
    """
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    pairs = one_step_pairs(sim, frames, conditions, max_batch=max_batch)
    cpu1, wall1 = _cpu_s(), time.perf_counter()
    log = train_non(corrector, pairs, weight, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                    progress=progress)
    cpu2, wall2 = _cpu_s(), time.perf_counter()
    return {"method": "non", "pairs": int(pairs[0].shape[0]), "simulation_steps": int(pairs[0].shape[0]),
            "steps": int(steps), "batch": int(batch_size), "lr": float(lr),
            "final_loss": log[-1]["loss"] if log else None,
            "pairs_cpu_s": round(cpu1 - cpu0, 3), "pairs_wall_s": round(wall1 - wall0, 3),
            "train_cpu_s": round(cpu2 - cpu1, 3), "train_wall_s": round(wall2 - wall1, 3),
            "cpu_s": round(cpu2 - cpu0, 3), "wall_s": round(wall2 - wall0, 3)}
