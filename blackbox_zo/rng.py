"""Random-number state: seeding a run, saving and restoring every generator, per-step seeds.

A checkpoint holds the state of torch's, numpy's and Python's global generators, so a
resumed run draws exactly what an uninterrupted one would (docs/reliability.md). Seeded
plans (RGE directions, linear interpolation's Q) do not use the global generators: each
step gets its own seed from `step_seed`, a pure function of the run's seed and the step.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state", "step_seed"]


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators from one run seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of the three global generators, as tensors and tuples `torch.load(weights_only=True)` reads."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step `step` (0-based) of a run seeded `run_seed`: the same on every rank and on resume."""
    return (run_seed * 1_000_003 + step * 7_919 + 12_345) % (2**62)
