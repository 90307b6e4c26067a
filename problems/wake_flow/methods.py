"""Rollouts, evaluation and the first-order baselines (NON, FO-SOL) for the wake flow.

* SRC: the low-fidelity solver alone (no corrector).
* NON: the corrector trained first-order on pre-generated pairs (P_s(y_t), y_{t+1}),
  outside the simulation loop (one step, the simulator never sees the corrector).
* FO-SOL: the corrector trained first-order through the differentiable PhiFlow torch
  backend, n unrolled steps of eq. (A3) (`oracles.simulator.unrolled_loss` with autograd).
* ZO-SOL lives in `problems.wake_flow.WakeFlowProblem` (the ZO trainer through the oracle).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from oracles.simulator import unrolled_loss
from oracles.wake_flow import WakeFlowSimulator

from .data import WakeData, WindowBatches

__all__ = ["rollout", "evaluate_mae", "one_step_pairs", "train_non", "train_fo_sol"]


def rollout(sim: WakeFlowSimulator, corrector: nn.Module | None, start: Tensor, reynolds: Tensor, steps: int,
            max_batch: int = 128) -> Tensor:
    """Corrected (or, with corrector=None, source) low-fidelity trajectory: [B, steps+1, ...]."""
    outs = []
    with torch.no_grad():
        for i in range(0, start.shape[0], max_batch):
            s, re = sim.reset(start[i : i + max_batch]), reynolds[i : i + max_batch]
            frames = [s]
            for _ in range(steps):
                s = sim.step(s, re)
                if corrector is not None:
                    s = s + corrector(s, re)
                frames.append(s)
            outs.append(torch.stack(frames, 1))
    return torch.cat(outs)


def evaluate_mae(sim: WakeFlowSimulator, corrector: nn.Module | None, frames: Tensor, reynolds: Tensor,
                 steps: int | None = None) -> tuple[Tensor, Tensor]:
    """MAE against the reference per run, averaged over the `steps` time steps after the start.

    Returns (mae per run [R], trajectories [R, steps+1, ...]). MAE over the valid faces of
    both velocity components.
    """
    steps = frames.shape[1] - 1 if steps is None else min(int(steps), frames.shape[1] - 1)
    traj = rollout(sim, corrector, frames[:, 0], reynolds, steps)
    mask = sim.mask
    err = ((traj[:, 1:] - frames[:, 1 : steps + 1]).abs() * mask).flatten(2).sum(2) / mask.sum()  # [R, steps]
    return err.mean(1), traj


def one_step_pairs(sim: WakeFlowSimulator, data: WakeData, max_batch: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """NON's training set: (P_s(y_t), y_{t+1}, Re) for every recorded training frame t < T."""
    r, t1 = data.train.shape[:2]
    inputs = data.train[:, :-1].reshape(r * (t1 - 1), *data.train.shape[2:])
    targets = data.train[:, 1:].reshape(r * (t1 - 1), *data.train.shape[2:])
    re = data.train_re[:, None].expand(r, t1 - 1).reshape(-1)
    with torch.no_grad():
        stepped = torch.cat([sim.step(inputs[i : i + max_batch], re[i : i + max_batch])
                             for i in range(0, inputs.shape[0], max_batch)])
    return stepped, targets, re


def _masked_mse(diff: Tensor, mask: Tensor) -> Tensor:
    return (diff.pow(2) * mask).flatten(1).sum(1).mean() / mask.sum()


def train_non(corrector: nn.Module, pairs: tuple[Tensor, Tensor, Tensor], mask: Tensor, *, steps: int, lr: float,
              batch_size: int = 32, seed: int = 0, log_every: int = 50) -> list[dict[str, Any]]:
    """First-order training on one-step pairs, outside the loop (Adam)."""
    stepped, targets, re = pairs
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(corrector.parameters(), lr=lr)
    log, start = [], time.perf_counter()
    for k in range(steps):
        idx = torch.randint(0, stepped.shape[0], (min(batch_size, stepped.shape[0]),), generator=gen)
        s = stepped[idx]
        loss = _masked_mse(s + corrector(s, re[idx]) - targets[idx], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k % log_every == 0 or k == steps - 1:
            log.append({"step": k + 1, "loss": float(loss), "wall_s": round(time.perf_counter() - start, 3)})
    return log


def train_fo_sol(corrector: nn.Module, sim: WakeFlowSimulator, batches: WindowBatches, *, steps: int, lr: float,
                 log_every: int = 10) -> list[dict[str, Any]]:
    """First-order solver-in-the-loop: backpropagate eq. (A3) through n unrolled PhiFlow steps (Adam)."""
    opt = torch.optim.Adam(corrector.parameters(), lr=lr)
    log, start, epoch, index = [], time.perf_counter(), 0, 0
    for k in range(steps):
        if index >= batches.num_batches(epoch):
            epoch, index = epoch + 1, 0
        b = batches.batch(epoch, index)
        index += 1
        loss = unrolled_loss(sim, corrector, b.start, b.targets, b.conditions, sim.mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k % log_every == 0 or k == steps - 1:
            log.append({"step": k + 1, "loss": float(loss), "wall_s": round(time.perf_counter() - start, 3)})
    return log
