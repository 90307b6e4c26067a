"""Control by queries only: CartPole-v1 and Pendulum-v1 policies trained through `GymPolicyOracle`.

`blackbox-zo train cartpole` / `blackbox-zo train pendulum` train a small MLP policy
from episode returns alone (loss = - mean return over the step's episodes, common
random numbers across perturbations). `blackbox-zo experiment gym` compares CGE and
RGE at the same number of queries per step on both problems and writes a table and
a plot of test return against queries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field

from blackbox_zo.config import Strict, TrainConfig, resolve_config
from blackbox_zo.problem import Problem, TrainingSetup

__all__ = ["GymSection", "GymControlConfig", "EpisodeSeedBatches", "CartPoleProblem", "PendulumProblem", "experiment"]


class GymSection(Strict):
    env_id: str = Field("CartPole-v1", description="registered gymnasium id")
    hidden: list[int] = Field([8], description="hidden widths of the tanh MLP policy")
    episodes_per_step: int = Field(3, ge=1, description="episode seeds per batch, shared by all perturbations")
    steps_per_epoch: int = Field(10, ge=1, description="training steps between evaluations")
    max_episode_steps: Optional[int] = Field(None, ge=1, description="episode length cap (None: the env's own)")
    test_episodes: int = Field(20, ge=1, description="fresh test episodes per evaluation")
    vectorization: Literal["auto", "sync", "async", "vector"] = Field(
        "auto", description="auto: gymnasium's numpy-vectorised env where supported (CartPole), else SyncVectorEnv")
    max_envs: int = Field(512, ge=1, description="sub-environments per vector env")
    obs_norm: bool = Field(False, description="running observation normalisation (updated once per step)")


class GymControlConfig(TrainConfig):
    gym: GymSection = GymSection()


class EpisodeSeedBatches:
    """Batch (epoch, i) = `episodes` fresh training seeds, a pure function of (seed, epoch, i)."""

    def __init__(self, episodes: int, steps_per_epoch: int, seed: int = 0):
        self.episodes, self.steps_per_epoch, self.seed = episodes, steps_per_epoch, seed

    def num_batches(self, epoch: int) -> int:
        return self.steps_per_epoch

    def batch(self, epoch: int, index: int) -> list[int]:
        from oracles.gym import episode_seeds

        return episode_seeds(self.seed, epoch * self.steps_per_epoch + index, self.episodes)


class _GymControlProblem(Problem):
    config_model = GymControlConfig
    headline_metric = "test_return"
    env_id = "CartPole-v1"
    defaults: dict[str, Any] = {}

    def default_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.defaults))  # a deep copy

    def setup(self, config: GymControlConfig) -> TrainingSetup:
        from oracles.gym import GymPolicyOracle, episode_seeds

        g = config.gym
        oracle = GymPolicyOracle(
            g.env_id, None, max_episode_steps=g.max_episode_steps, hidden=tuple(g.hidden),
            vectorization=g.vectorization, max_envs=g.max_envs, seed=config.run.seed,
        )
        if g.obs_norm:  # rebuild with a normaliser in front (same seed, same weights)
            from oracles.gym import mlp_policy

            torch.manual_seed(config.run.seed)
            n_out = oracle.policy[-1].out_features
            policy = mlp_policy(oracle.obs_dim, n_out, g.hidden, obs_norm=True)
            oracle.close()
            oracle = GymPolicyOracle(g.env_id, policy, max_episode_steps=g.max_episode_steps,
                                     vectorization=g.vectorization, max_envs=g.max_envs)
        test_seeds = episode_seeds(config.run.seed, 0, g.test_episodes, test=True)
        return TrainingSetup(
            oracle=oracle,
            train_batches=EpisodeSeedBatches(g.episodes_per_step, g.steps_per_epoch, config.run.seed),
            module=oracle.policy,
            evaluate=lambda module: oracle.evaluate(module, test_seeds),
            extras={"test_seeds": test_seeds},
        )


class CartPoleProblem(_GymControlProblem):
    name = "cartpole"
    description = "CartPole-v1, tanh MLP policy (58 parameters) trained from episode returns only; target: mean test return >= 475"
    env_id = "CartPole-v1"
    defaults = {
        "problem": "cartpole",
        "estimator": {"kind": "cge", "mu": 0.05, "scheme": "forward", "q": 58},
        "optimizer": {"name": "adam", "lr": 0.05},
        "schedule": {"name": "constant"},
        "run": {"epochs": 12, "seed": 0},
        "gym": {"env_id": "CartPole-v1", "hidden": [8], "episodes_per_step": 3, "steps_per_epoch": 5,
                "max_episode_steps": 500, "test_episodes": 20},
    }


class PendulumProblem(_GymControlProblem):
    name = "pendulum"
    description = "Pendulum-v1 swing-up, tanh MLP policy (41 parameters) trained from episode returns only"
    env_id = "Pendulum-v1"
    defaults = {
        "problem": "pendulum",
        "estimator": {"kind": "cge", "mu": 0.05, "scheme": "forward", "q": 41},
        "optimizer": {"name": "adam", "lr": 0.05},
        "schedule": {"name": "constant"},
        "run": {"epochs": 20, "seed": 0},
        "gym": {"env_id": "Pendulum-v1", "hidden": [8], "episodes_per_step": 2, "steps_per_epoch": 10,
                "max_episode_steps": 200, "test_episodes": 20},
    }
