"""The paper's recipe: ResNet-20 on CIFAR-10 trained by DeepZero (Sec. 6.1, Algorithm 2).

Sparse-CGE (mu 5e-3) with 90% gradient sparsity from ZO-GraSP (q 192, layer-wise ratios,
coordinates resampled every 5 epochs), SGD lr 0.1 / momentum 0.9 / weight decay 5e-4,
cosine schedule with a 3-epoch warm-up (DeepZero's code), 50 epochs, batch 256; every
coordinate query goes through exact feature reuse (blackbox_zo.reuse). A GPU job:
`blackbox-zo train cifar10 --set run.device=cuda`; docs/cifar10.md says what it costs.

CIFAR-10 is read from a local directory in the standard python-pickle layout
(`<data.root>/cifar-10-batches-py/data_batch_1..5, test_batch`, as torchvision's
CIFAR10(root, download=False) reads it); nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from blackbox_zo.config import SparsityField, Strict, TrainConfig, active_sparsity
from blackbox_zo.problem import Problem, ProblemSetupError, TrainingSetup
from blackbox_zo.sparsity import balanced_indices, build_sparse_sampler
from oracles.model_loss import ModelLossOracle
from problems.models import resnet20

__all__ = ["Cifar10Problem", "Cifar10Config", "CifarBatches", "load_cifar10", "read_cifar_batch", "CIFAR_DIRNAME"]

CIFAR_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# per-channel mean / std of the training images, as DeepZero's data pipeline normalises
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


# ------------------------------------------------------------------------------ reading


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core
    return core.multiarray._reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickling runs code named in the file, so this one resolves only the globals a
    CIFAR-10 batch contains: a dict of lists, strings and one uint8 numpy array, whose
    pickle names numpy's array reconstructor, ndarray and dtype (spelled numpy.core by
    the original files, numpy._core by numpy >= 2). Anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only lists, strings and numpy arrays")
        return resolve()


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file -> (images uint8 [n, 3, 32, 32], labels int64 [n])."""
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            # latin1: how Python-2 pickles of numpy arrays must be read (numpy's and torchvision's advice)
            entry = _CifarUnpickler(fh, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise ProblemSetupError(f"{path}: not a CIFAR-10 batch ({exc})") from None
    if not isinstance(entry, dict) or "data" not in entry or not ({"labels", "fine_labels"} & set(entry)):
        raise ProblemSetupError(f"{path}: not a CIFAR-10 batch (expected a dict with 'data' and 'labels')")
    data = entry["data"]
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ProblemSetupError(f"{path}: 'data' must be a uint8 array [n, 3072], got "
                                f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if labels.shape != (data.shape[0],) or (labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) <= 9)):
        raise ProblemSetupError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, labels


def cifar_dir(root: str | Path) -> Path:
    """`root/cifar-10-batches-py`, or `root` itself if it is that directory."""
    root = Path(root).expanduser()
    return root if (root / TEST_FILE).is_file() and not (root / CIFAR_DIRNAME).is_dir() else root / CIFAR_DIRNAME


def load_cifar10(root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train uint8 [50000, 3, 32, 32], y_train, x_test uint8 [10000, 3, 32, 32], y_test)."""
    d = cifar_dir(root)
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not (d / f).is_file()]
    if missing:
        raise ProblemSetupError(
            f"CIFAR-10 not found: looked for {d.resolve()}/{{data_batch_1..5,test_batch}} (missing: {', '.join(missing)}); "
            f"download {CIFAR_URL} and extract it into {Path(root).expanduser().resolve()} "
            f"(or point data.root at the directory that holds {CIFAR_DIRNAME}/)")
    train = [read_cifar_batch(d / f) for f in TRAIN_FILES]
    x_test, y_test = read_cifar_batch(d / TEST_FILE)
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test


# ------------------------------------------------------------------------------ batches


def standardize(x: Tensor) -> Tensor:
    """Images in [0, 1] -> zero mean, unit variance per channel (the training set's statistics)."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def normalize(images_u8: Tensor) -> Tensor:
    return standardize(images_u8.float() / 255.0)


class CifarBatches:
    """Shuffled mini-batches of uint8 images, with the standard CIFAR augmentation (random
    32x32 crop of the 4-pixel zero-padded image, horizontal flip) drawn from a generator
    seeded by (seed, epoch, index): batch(e, i) is a pure function, so every perturbation
    of a step sees the same images (common random numbers) and a resumed run the same data."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int = 0, augment: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.n = images.shape[0]
        self.batch_size = min(batch_size, self.n)
        self.seed, self.augment = seed, augment
        self._perm_epoch: int | None = None
        self._perm: Tensor | None = None

    def num_batches(self, epoch: int) -> int:
        return self.n // self.batch_size

    def _order(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        idx = self._order(epoch)[index * self.batch_size : (index + 1) * self.batch_size].to(self.images.device)
        x = self.images[idx].float() / 255.0
        if self.augment:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + index)
            x = augment(x, gen)
        return standardize(x), self.labels[idx]


def augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop of the zero-padded images and random horizontal flip, per image, vectorised."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


# ------------------------------------------------------------------------------ problem


class Cifar10DataConfig(Strict):
    """The `data` section of CIFAR-10: where it is, the batches and the augmentation (the split is CIFAR's own)."""

    batch_size: int = Field(64, ge=1, description="images per step (one query evaluates one batch)")
    root: str = Field("data", description=f"directory holding {CIFAR_DIRNAME}/")
    augment: bool = Field(True, description="random crop (pad 4) + horizontal flip, per step")
    train_size: Optional[int] = Field(None, ge=1, description="use the first n training images (none: all)")
    test_size: Optional[int] = Field(None, ge=1, description="evaluate on the first n test images (none: all)")
    eval_batch_size: int = Field(1000, ge=1, description="test images per forward pass of an evaluation")


class Cifar10ModelConfig(Strict):
    """The `model` section of CIFAR-10: how ResNet-20's coordinate queries are evaluated."""

    feature_reuse: bool = Field(True, description="exact feature reuse for coordinate queries (blackbox_zo.reuse)")
    reuse_granularity: Literal["layer", "stage"] = Field(
        "layer", description="with feature_reuse: layer (linearity inside blocks) or stage (DeepZero's "
        "block-level reuse)")
    memory_cap_mb: Optional[int] = Field(
        None, ge=1, description="memory for perturbations evaluated at once (default 256 on CPU, 4096 on CUDA, "
                                "where bigger chunks mean fewer kernel launches)")


class Cifar10Config(TrainConfig):
    """cifar10: the data set (data), ZO-GraSP sparsity, ResNet-20's query path (model)."""

    # run directories written before the sections were split recorded data.seed, which CIFAR-10 never used
    retired_settings = ("data.seed",)
    data: Cifar10DataConfig = Field(default_factory=Cifar10DataConfig, description="CIFAR-10 and its batches")
    sparsity: SparsityField = None
    model: Cifar10ModelConfig = Field(default_factory=Cifar10ModelConfig, description="ResNet-20's query path")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ProblemSetupError(f"run.device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProblemSetupError(f"run.device={name!r} but this torch ({torch.__version__}) sees no CUDA device; "
                                "use run.device=cpu or install a CUDA build of torch")
    return device


class Cifar10Problem(Problem):
    name = "cifar10"
    description = "ResNet-20 on CIFAR-10, DeepZero's recipe (Sparse-CGE 90%, ZO-GraSP, feature reuse); a GPU job"
    config_model = Cifar10Config
    devices = ("cpu", "cuda")

    def default_config(self) -> dict[str, Any]:
        return {
            "problem": "cifar10",
            "estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"},
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
            "schedule": {"name": "cosine", "warmup_epochs": 3.0},
            "data": {"batch_size": 256},
            "run": {"epochs": 50, "seed": 0},
            "sparsity": {"enabled": True, "method": "zo-grasp", "sparsity": 0.9, "q": 192, "mu": 5e-3,
                         "resample_every_epochs": 5},
        }

    def setup(self, config: Cifar10Config) -> TrainingSetup:
        device = _device(config.run.device)
        x_tr, y_tr, x_te, y_te = load_cifar10(config.data.root)
        if config.data.train_size is not None:
            x_tr, y_tr = x_tr[: config.data.train_size], y_tr[: config.data.train_size]
        if config.data.test_size is not None:
            x_te, y_te = x_te[: config.data.test_size], y_te[: config.data.test_size]
        x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
        torch.manual_seed(config.run.seed)
        module = resnet20().to(device)
        cap_mb = config.model.memory_cap_mb or (4096 if device.type == "cuda" else 256)
        oracle = ModelLossOracle(module, nn.functional.cross_entropy, feature_reuse=config.model.feature_reuse,
                                 reuse_granularity=config.model.reuse_granularity, memory_cap_bytes=cap_mb * 2**20)
        eval_bs = config.data.eval_batch_size

        def evaluate(m: nn.Module) -> dict[str, float]:
            correct, loss_sum = 0, 0.0
            with torch.no_grad():
                for i in range(0, x_te.shape[0], eval_bs):
                    logits = m(normalize(x_te[i : i + eval_bs]))
                    y = y_te[i : i + eval_bs]
                    correct += int((logits.argmax(1) == y).sum())
                    loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            n = max(1, x_te.shape[0])
            return {"test_acc": correct / n, "test_loss": loss_sum / n}

        def fo_loss(m: nn.Module, batch) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(m(x), y)

        coord_sampler, extras = None, {"device": str(device), "parameters": oracle.space.dim}
        sparsity = active_sparsity(config)
        if sparsity is not None:
            # DeepZero: ZO-GraSP on a class-balanced batch at init (queries charged to `prune`),
            # layer-wise ratios, then Sparse-CGE on a fresh coordinate set every K epochs.
            idx = balanced_indices(y_tr.cpu(), sparsity.samples_per_class, seed=config.run.seed).to(device)
            prune_batch = (normalize(x_tr[idx]), y_tr[idx])
            coord_sampler, extras["sparsity"] = build_sparse_sampler(
                oracle, oracle.initial_theta(), prune_batch, sparsity, seed=config.run.seed)

        return TrainingSetup(
            oracle=oracle,
            train_batches=CifarBatches(x_tr, y_tr, config.data.batch_size, seed=config.run.seed,
                                       augment=config.data.augment),
            module=module,
            evaluate=evaluate,
            fo_loss=fo_loss,
            coord_sampler=coord_sampler,
            extras=extras,
        )
