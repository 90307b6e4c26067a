"""Wake-flow data: high-fidelity runs per Reynolds number, downsampled to the low-fidelity grid.

All Reynolds numbers (train and test) run as ONE batched high-fidelity simulation from
rest (uy = 1) plus a sideways poke behind the rod; the first `skip_steps` steps (the
transient before vortices shed) are dropped, then `record_steps + 1` frames are
restricted onto the low-fidelity grid (flux-conserving, `restrict_staggered`). The
result is cached under `<cache_dir>/wake_flow/` (default `data_cache/`, git-ignored),
keyed by a hash of every parameter that affects it (the spec, both geometries, the data
format version, the PhiFlow and torch versions), and written atomically (temp file +
`os.replace`). Low-fidelity runs (SRC, the corrected ones) start from the downsampled
high-fidelity frame, as in the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from oracles.simulator import SolBatch
from oracles.wake_flow import WakeFlowGeometry, face_mask, restrict_staggered, shared_simulator

__all__ = ["PAPER_TRAIN_RE", "PAPER_TEST_RE", "WakeDataSpec", "WakeData", "generate", "load_or_generate",
           "cache_path", "WindowBatches", "normalisation_stats", "DATA_FORMAT_VERSION"]

PAPER_TRAIN_RE = (97.7, 195.3, 390.6, 781.3, 1562.5, 3125.0)
PAPER_TEST_RE = (146.5, 293.0, 585.9, 1171.9, 2343.8)
DATA_FORMAT_VERSION = 2  # bump when the generator changes in a way the key does not see


@dataclass(frozen=True)
class WakeDataSpec:
    """Everything that determines the data set (all of it goes into the cache key)."""

    lo_nx: int = 32
    lo_ny: int = 64
    hifi_factor: int = 2  # 2: 64x128 (the paper's text); 4: 128x256 (the reference code)
    skip_steps: int = 2000
    record_steps: int = 500
    train_re: tuple[float, ...] = PAPER_TRAIN_RE
    test_re: tuple[float, ...] = PAPER_TEST_RE
    poke: float = 1.0
    cg_tolerance: float = 1e-5

    def __post_init__(self):
        if self.hifi_factor < 1:
            raise ValueError(f"hifi_factor must be >= 1, got {self.hifi_factor}")
        if self.skip_steps < 0 or self.record_steps < 1:
            raise ValueError(f"need skip_steps >= 0 and record_steps >= 1, got {self.skip_steps}, {self.record_steps}")
        if not self.train_re or not self.test_re:
            raise ValueError("train_re and test_re must not be empty")
        if min(self.train_re + self.test_re) <= 0:
            raise ValueError("Reynolds numbers must be > 0")

    @property
    def lo_geometry(self) -> WakeFlowGeometry:
        return WakeFlowGeometry(nx=self.lo_nx, ny=self.lo_ny)

    @property
    def hi_geometry(self) -> WakeFlowGeometry:
        return WakeFlowGeometry(nx=self.lo_nx * self.hifi_factor, ny=self.lo_ny * self.hifi_factor)

    @property
    def min_reynolds(self) -> float:
        return min(self.train_re + self.test_re)

    def key(self) -> str:
        blob = json.dumps({"spec": asdict(self), "hi": asdict(self.hi_geometry), "lo": asdict(self.lo_geometry),
                           "format": DATA_FORMAT_VERSION, "phiflow": _phiflow_version(),
                           "torch": torch.__version__.split("+")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _phiflow_version() -> str:
    try:
        import phi

        return str(phi.__version__)
    except Exception:  # pragma: no cover
        return "unknown"


@dataclass
class WakeData:
    spec: WakeDataSpec
    train: Tensor  # [R_train, T+1, 2, nx+1, ny+1]  downsampled high-fidelity frames
    test: Tensor  # [R_test, T+1, 2, nx+1, ny+1]
    train_re: Tensor  # [R_train]
    test_re: Tensor  # [R_test]
    stats: dict[str, float] = field(default_factory=dict)  # std_ux, std_uy, std_re (train data)
    generation_s: float = 0.0


def normalisation_stats(train: Tensor, train_re: Tensor, mask: Tensor) -> dict[str, float]:
    """The reference's input scales: std of |ux|, |uy| over the valid faces of all training
    frames, and std of |Re| over the training runs (population std, as numpy computes it)."""
    ux = train[:, :, 0][..., mask[0].bool()].abs()
    uy = train[:, :, 1][..., mask[1].bool()].abs()
    std_re = float(train_re.abs().std(unbiased=False)) if train_re.numel() > 1 else float(train_re.abs().mean())
    return {"std_ux": float(ux.std(unbiased=False)), "std_uy": float(uy.std(unbiased=False)), "std_re": std_re}


def generate(spec: WakeDataSpec, progress: bool = True) -> WakeData:
    """Run the high-fidelity simulations (all Reynolds numbers in one batch) and downsample."""
    start = time.perf_counter()
    sim = shared_simulator(spec.hi_geometry, min_reynolds=spec.min_reynolds, cg_tolerance=spec.cg_tolerance)
    re = torch.tensor(spec.train_re + spec.test_re, dtype=torch.float32)
    state = sim.initial_state(re.numel(), poke=spec.poke)
    frames = []
    total = spec.skip_steps + spec.record_steps
    hi = spec.hi_geometry
    with torch.no_grad(), tqdm(total=total, desc=f"wake-flow data: {re.numel()} high-fidelity runs {hi.nx}x{hi.ny}",
                               disable=not progress, dynamic_ncols=True, unit="step") as bar:
        for i in range(total + 1):
            if i > 0:
                state = sim.step(state, re)
                bar.update(1)
            if i >= spec.skip_steps:
                frames.append(restrict_staggered(state, spec.hifi_factor))
    traj = torch.stack(frames, 1)  # [R, T+1, 2, nx+1, ny+1]
    if not torch.isfinite(traj).all():
        raise FloatingPointError("the high-fidelity simulation produced non-finite values")
    n_train = len(spec.train_re)
    lo_mask = face_mask(spec.lo_nx, spec.lo_ny)
    data = WakeData(spec, traj[:n_train].contiguous(), traj[n_train:].contiguous(), re[:n_train], re[n_train:])
    data.stats = normalisation_stats(data.train, data.train_re, lo_mask)
    data.generation_s = time.perf_counter() - start
    return data


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cache_path(spec: WakeDataSpec, cache_dir: str | Path = "data_cache") -> Path:
    return Path(cache_dir) / "wake_flow" / f"wake_{spec.key()}.pt"


def _load(path: Path, spec: WakeDataSpec) -> WakeData:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if json.loads(blob["spec"]) != json.loads(json.dumps(asdict(spec))):
        raise ValueError(f"cache file {path} holds another spec")
    return WakeData(spec, blob["train"], blob["test"], blob["train_re"], blob["test_re"],
                    {k: float(v) for k, v in blob["stats"].items()}, float(blob["generation_s"]))


def load_or_generate(spec: WakeDataSpec, cache_dir: str | Path = "data_cache", progress: bool = True) -> WakeData:
    """The cached data for `spec`, generating (and caching) it first if needed."""
    path = cache_path(spec, cache_dir)
    if path.exists():
        try:
            return _load(path, spec)
        except Exception as exc:  # a damaged or foreign file: regenerate rather than fail
            warnings.warn(f"ignoring unreadable wake-flow cache {path}: {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=2)
    data = generate(spec, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({"train": data.train, "test": data.test, "train_re": data.train_re, "test_re": data.test_re,
                        "stats": data.stats, "generation_s": data.generation_s,
                        "spec": json.dumps(asdict(spec))}, path)
    return data


class WindowBatches:
    """Batches of W (simulation, start frame) windows of n unrolled steps; implements BatchSource.

    Window (r, t): start = frame t of run r, targets = frames t+1 .. t+n. The order of
    epoch e is a pure function of (seed, e), so a resumed run sees the same batches.
    `batches_per_epoch` caps an epoch (each epoch then sees a fresh random subset), which
    makes an "epoch" short enough for the sparsity resampling period of a CPU run.
    """

    def __init__(self, frames: Tensor, reynolds: Tensor, unroll: int, windows: int, seed: int = 0, stride: int = 1,
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
        self.frames, self.reynolds, self.unroll, self.seed = frames, reynolds, int(unroll), int(seed)
        starts = torch.arange(0, t1 - unroll, stride)
        self.index = torch.cartesian_prod(torch.arange(runs), starts)  # [N, 2] (run, t)
        self.windows = min(int(windows), self.index.shape[0])
        full = self.index.shape[0] // self.windows
        self._per_epoch = full if batches_per_epoch is None else min(full, int(batches_per_epoch))

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
        return SolBatch(self.frames[r, t].clone(), targets.clone(), self.reynolds[r].clone())
