"""Reference trajectories for solver-in-the-loop: the `.npz` file format, the twin's cache, windows.

**The file format** (`--set sol.data=FILE.npz`), read with ``numpy.load(allow_pickle=False)``:

============== ====================================== ===========================================
key            shape, dtype                           meaning
============== ====================================== ===========================================
``frames``     [runs, T+1, *state_shape], float       reference states on the simulator's grid
``conditions`` [runs] or [runs, C], float             what each run's simulation is given (e.g. Re)
``test``       [runs], bool                           True: a held-out test run
============== ====================================== ===========================================

Frame 0 of every run is where its rollouts start; frames t+1..t+n are the targets of the
window starting at t. `state_shape` must be the simulator's; at least one run must be a
training run and one a test run. Anything else in the file is ignored.

**The twin**: with no `sol.data`, a simulator that has a high-fidelity twin
(`reference_data()`) produces the trajectories itself; they are cached under
`<sol.cache_dir>/sol/<simulator>_<key>.npz` in the same format, keyed by the simulator's
name, its options, its own `cache_key()` (if any) and the torch and numpy versions, and
written atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from blackbox_zo.rundir import atomic_write_bytes
from oracles.simulator import ReferenceRuns, SolBatch

__all__ = ["load_reference", "save_reference", "twin_cache_path", "reference_runs", "WindowBatches",
           "normalisation", "DATA_FORMAT_VERSION", "REQUIRED_KEYS"]

DATA_FORMAT_VERSION = 1
REQUIRED_KEYS = ("frames", "conditions", "test")


class ReferenceDataError(ValueError):
    """A reference file that cannot be used; the message names the file and what is wrong."""


def load_reference(path: str | Path, state_shape: tuple[int, ...] | None = None) -> ReferenceRuns:
    """Read and validate a reference `.npz` (module docstring); `state_shape` is the simulator's."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceDataError(f"sol.data: no file {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in REQUIRED_KEYS if k not in npz.files]
            if missing:
                raise ReferenceDataError(f"sol.data: {path} lacks {', '.join(missing)} (needs frames [runs, T+1, "
                                         "*state], conditions [runs] or [runs, C], test [runs] bool; docs/sol.md)")
            frames, conditions, test = (np.asarray(npz[k]) for k in REQUIRED_KEYS)
    except ReferenceDataError:
        raise
    except Exception as exc:  # not a zip, pickled objects, a truncated file
        raise ReferenceDataError(f"sol.data: cannot read {path} as .npz: {type(exc).__name__}: {exc}") from exc
    if frames.dtype.kind != "f" or conditions.dtype.kind not in "fiu":
        raise ReferenceDataError(f"sol.data: {path}: frames must be float and conditions numeric, got "
                                 f"{frames.dtype} and {conditions.dtype}")
    if test.dtype != np.bool_:
        raise ReferenceDataError(f"sol.data: {path}: test must be bool, got {test.dtype}")
    try:
        runs = ReferenceRuns(torch.from_numpy(frames.astype(np.float32)),
                             torch.from_numpy(conditions.astype(np.float32)), torch.from_numpy(test),
                             description=str(path))
    except ValueError as exc:
        raise ReferenceDataError(f"sol.data: {path}: {exc}") from exc
    if state_shape is not None and runs.state_shape != tuple(state_shape):
        raise ReferenceDataError(f"sol.data: {path} holds states of shape {runs.state_shape}, the simulator's "
                                 f"state_shape is {tuple(state_shape)}")
    return runs


def save_reference(runs: ReferenceRuns, path: str | Path) -> Path:
    """Write `runs` in the file format, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda fh: np.savez(fh, frames=runs.frames.numpy(), conditions=runs.conditions.numpy(),
                                                 test=runs.test.numpy()))
    return path


def twin_cache_path(simulator_name: str, options: dict[str, Any], simulator: Any, cache_dir: str | Path) -> Path:
    key_fn = getattr(simulator, "cache_key", None)
    blob = json.dumps({"simulator": simulator_name, "options": options, "format": DATA_FORMAT_VERSION,
                       "own": key_fn() if callable(key_fn) else None, "torch": torch.__version__.split("+")[0],
                       "numpy": np.__version__}, sort_keys=True, default=str)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in simulator_name)
    return Path(cache_dir) / "sol" / f"{safe}_{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


def reference_runs(simulator: Any, simulator_name: str, options: dict[str, Any], data: str | None, cache_dir: str,
                   progress: bool = True, log=print) -> tuple[ReferenceRuns, dict[str, Any]]:
    """The reference trajectories: from `data` (a file) or from the simulator's twin (cached).

    Returns (runs, info) with info = {"source", "path", "cached", "seconds"}.
    """
    start = time.perf_counter()
    if data:
        runs = load_reference(data, tuple(simulator.state_shape))
        return runs, {"source": "file", "path": str(data), "cached": True, "seconds": time.perf_counter() - start}
    twin = getattr(simulator, "reference_data", None)
    if not callable(twin):
        raise ReferenceDataError(f"simulator {simulator_name!r} has no high-fidelity twin (reference_data): give "
                                 "reference trajectories with --set sol.data=FILE.npz (the format: docs/sol.md)")
    path = twin_cache_path(simulator_name, options, simulator, cache_dir)
    if path.exists():
        try:
            runs = load_reference(path, tuple(simulator.state_shape))
            return runs, {"source": "twin", "path": str(path), "cached": True, "seconds": time.perf_counter() - start}
        except ReferenceDataError as exc:  # a damaged cache file: make it again
            log(f"ignoring unreadable cache {path}: {exc}")
    runs = twin(progress=progress)
    if tuple(runs.state_shape) != tuple(simulator.state_shape):
        raise ReferenceDataError(f"simulator {simulator_name!r}: its twin made states of shape {runs.state_shape}, "
                                 f"its state_shape is {tuple(simulator.state_shape)}")
    save_reference(runs, path)
    return runs, {"source": "twin", "path": str(path), "cached": False, "seconds": time.perf_counter() - start}


def normalisation(frames: Tensor, conditions: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """Scales of the training data: `state_std` per channel of a grid state (dim 0 of the state) or
    per entry of a vector state, over the valid entries of every frame; `cond_std` per condition
    (population std; the mean |value| when a condition does not vary; 1 when it is all 0)."""
    state_shape = frames.shape[2:]
    flat = frames.reshape(-1, *state_shape).double()
    m = torch.ones(state_shape, dtype=torch.float64) if mask is None else mask.double()
    if len(state_shape) >= 2:  # grid: one scale per channel
        reduce = tuple(range(1, len(state_shape)))
        count = m.sum(reduce) * flat.shape[0]
        mean = (flat * m).sum((0, *[d + 1 for d in reduce])) / count
        centred = (flat - mean.view(-1, *[1] * len(reduce))) * m
        var = centred.pow(2).sum((0, *[d + 1 for d in reduce])) / count
    else:  # vector: one scale per entry
        var = flat.var(0, unbiased=False)
    state_std = var.sqrt()
    state_std = torch.where(state_std > 0, state_std, torch.ones_like(state_std))
    cond = conditions.double().reshape(conditions.shape[0], -1)
    cond_std = cond.std(0, unbiased=False) if cond.shape[0] > 1 else cond.abs().mean(0)
    fallback = cond.abs().mean(0)
    cond_std = torch.where(cond_std > 1e-12 * fallback.clamp_min(1e-300), cond_std, fallback)
    cond_std = torch.where(cond_std > 0, cond_std, torch.ones_like(cond_std))
    return {"state_std": state_std.float(), "cond_std": cond_std.float()}


class WindowBatches:
    """Batches of W (run, start frame) windows of n unrolled steps; implements BatchSource.

    Window (r, t): start = frame t of run r, targets = frames t+1 .. t+n. The order of
    epoch e is a pure function of (seed, e), so a resumed run sees the same batches.
    `batches_per_epoch` caps an epoch (each epoch then sees a fresh random subset), which
    makes an "epoch" short enough for the sparsity resampling period of a CPU run.
    """

    def __init__(self, frames: Tensor, conditions: Tensor, unroll: int, windows: int, seed: int = 0, stride: int = 1,
                 batches_per_epoch: int | None = None):
        runs, t1 = frames.shape[:2]
        if unroll < 1 or unroll >= t1:
            raise ValueError(f"unroll must be in [1, {t1 - 1}] for {t1} recorded frames, got {unroll}")
        if windows < 1:
            raise ValueError(f"windows must be >= 1, got {windows}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.frames, self.conditions, self.unroll, self.seed = frames, conditions, int(unroll), int(seed)
        starts = torch.arange(0, t1 - unroll, stride)
        self.index = torch.cartesian_prod(torch.arange(runs), starts)  # [N, 2] (run, t)
        self.windows = min(int(windows), self.index.shape[0])
        full = self.index.shape[0] // self.windows
        self._per_epoch = full if batches_per_epoch is None else min(full, int(batches_per_epoch))

    @property
    def reynolds(self) -> Tensor:  # the wake flow's name for its conditions
        return self.conditions

    def num_batches(self, epoch: int) -> int:
        return self._per_epoch

    def batch(self, epoch: int, index: int) -> SolBatch:
        if not 0 <= index < self._per_epoch:
            raise IndexError(f"batch index {index} outside [0, {self._per_epoch})")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.index.shape[0], generator=gen)
        picked = self.index[order[index * self.windows : (index + 1) * self.windows]]
        return self.windows_at(picked)

    def windows_at(self, picked: Tensor) -> SolBatch:
        r, t = picked[:, 0], picked[:, 1]
        offsets = torch.arange(1, self.unroll + 1)
        targets = self.frames[r[:, None], t[:, None] + offsets[None, :]]  # [W, n, ...]
        return SolBatch(self.frames[r, t].clone(), targets.clone(), self.conditions[r].clone())
