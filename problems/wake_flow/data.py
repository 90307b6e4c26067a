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
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from blackbox_zo.rundir import atomic_write_bytes
from oracles.wake_flow import PAPER_TEST_RE, PAPER_TRAIN_RE, WakeFlowGeometry, face_mask, high_fidelity_frames
from problems.sol.data import WindowBatches  # generic; imported here for the wake flow's callers

__all__ = ["PAPER_TRAIN_RE", "PAPER_TEST_RE", "WakeDataSpec", "WakeData", "generate", "load_or_generate",
           "cache_path", "WindowBatches", "normalisation_stats", "DATA_FORMAT_VERSION"]

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
    re = torch.tensor(spec.train_re + spec.test_re, dtype=torch.float32)
    traj = high_fidelity_frames(spec.hi_geometry, spec.hifi_factor, re, skip_steps=spec.skip_steps,
                                record_steps=spec.record_steps, poke=spec.poke, cg_tolerance=spec.cg_tolerance,
                                min_reynolds=spec.min_reynolds, progress=progress)  # [R, T+1, 2, nx+1, ny+1]
    n_train = len(spec.train_re)
    lo_mask = face_mask(spec.lo_nx, spec.lo_ny)
    data = WakeData(spec, traj[:n_train].contiguous(), traj[n_train:].contiguous(), re[:n_train], re[n_train:])
    data.stats = normalisation_stats(data.train, data.train_re, lo_mask)
    data.generation_s = time.perf_counter() - start
    return data


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
    blob = {"train": data.train, "test": data.test, "train_re": data.train_re, "test_re": data.test_re,
            "stats": data.stats, "generation_s": data.generation_s, "spec": json.dumps(asdict(spec))}
    atomic_write_bytes(path, lambda fh: torch.save(blob, fh))
    return data
