"""The stop-and-resume check several tests share: a run stopped after N steps and resumed must end
bitwise where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from blackbox_zo.rundir import CHECKPOINT_NAME
from blackbox_zo.trainer import train


def stop_and_resume(config: Callable[..., tuple[Any, Any]], tmp_path: Path, stop_at: int, metric: str = "test_acc"):
    """Train `config()` whole (tmp_path/full), `config("run.max_steps=stop_at")` (tmp_path/half), resume the
    latter with `config()`; assert the final module tensors, queries and test metric (`metric`) are equal.

    `config(*overrides)` returns (problem, resolved config). Returns (full summary, resumed summary, full
    checkpoint, resumed checkpoint) for the caller's own checks of the state that rode in the checkpoint."""
    p, cfg = config()
    full = train(p, cfg, run_dir=tmp_path / "full")
    p, cfg = config(f"run.max_steps={stop_at}")
    train(p, cfg, run_dir=tmp_path / "half")
    p, cfg = config()
    resumed = train(p, cfg, resume=tmp_path / "half")
    a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "half" / CHECKPOINT_NAME, weights_only=True)
    assert a["module"].keys() == b["module"].keys()
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    assert full["queries"] == resumed["queries"] and full[metric] == resumed[metric]
    return full, resumed, a, b
