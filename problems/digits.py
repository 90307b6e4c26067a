"""The main job: scikit-learn's bundled 8x8 digits, a ~3.8K-parameter CNN, trained by queries only."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from blackbox_zo.config import DataConfig, SparsityField, Strict, TrainConfig, active_sparsity
from blackbox_zo.problem import Problem, TensorBatches, TrainingSetup
from blackbox_zo.rundir import atomic_write_text
from blackbox_zo.sparsity import balanced_indices, build_sparse_sampler
from oracles.model_loss import ModelLossOracle

__all__ = ["load_digits_split", "stratified_split", "make_digits_cnn", "DigitsProblem", "DigitsConfig",
           "DEEPZERO_RECIPE", "SEP_CMA_THEN_SPARSE_CGE", "ES_LAST_THEN_SPARSE_CGE", "SUBSPACE_THEN_SPARSE_CGE",
           "freeze_leading_convs"]

# DeepZero (Algorithm 2) tuned for digits: ZO-GraSP (q = 192, mu = 5e-3, 25 examples per class) at init ->
# layer-wise ratios at 90% sparsity -> Sparse-CGE on a fresh LPR-obeying set every epoch, SGD 0.1 with
# momentum, cosine, batch 16, 10 epochs (docs/digits.md). As --set values over the digits defaults:
#   --set estimator=cge --set estimator.mu=0.005 --set run.epochs=10 --set phase2=none
DEEPZERO_RECIPE: dict[str, Any] = {
    "estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "schedule": {"name": "cosine", "warmup_epochs": 0.0},
    "data": {"batch_size": 16},
    "run": {"epochs": 10},
    "sparsity": {"enabled": True, "method": "zo-grasp", "sparsity": 0.9, "ranking": "largest", "q": 192,
                 "mu": 5e-3, "samples_per_class": 25, "resample_every_epochs": 1},
    "phase2": None,
}

# The digits default before ES_LAST_THEN_SPARSE_CGE (docs/efficiency.md): sep-CMA-ES (lambda = 28, sigma_0 = 0.02)
# for 715 steps (20,020 queries), then the recipe's Sparse-CGE with SGD 0.05 (momentum 0.9, cosine over the 620
# steps left of 15 epochs), all on 16-image batches.
SEP_CMA_THEN_SPARSE_CGE: dict[str, Any] = {
    **DEEPZERO_RECIPE,
    "estimator": {"kind": "sep-cma-es", "mu": 0.02, "popsize": 28},
    "run": {"epochs": 15},
    "phase1": None,  # both phases on the run's 16-image batches
    "phase2": {"after_steps": 715, "estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"},
               "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
               "schedule": {"name": "cosine", "warmup_epochs": 0.0}, "batch_size": None},
}

# The digits default before SUBSPACE_THEN_SPARSE_CGE (docs/efficiency.md): two phases, both on 64-image batches.
# Phase 1: ES on the last layer only (estimator.blocks; q = 28 antithetic pairs, sigma 0.1, Adam 0.2 cosine,
# `phase1`): the oracle runs the conv layers once per batch, so a query costs about a tenth of a whole-network
# one; 536 steps (30,016 queries). Phase 2: the recipe's Sparse-CGE on every layer with Adam 5e-3 (cosine over
# the 256 steps left of 36 epochs). The run's own optimizer, schedule and batch size stay the recipe's, so
# DeepZero's recipe is four --set values away: estimator=cge, estimator.mu=0.005, run.epochs=10, phase2=none.
ES_LAST_THEN_SPARSE_CGE: dict[str, Any] = {
    **DEEPZERO_RECIPE,
    "estimator": {"kind": "es", "q": 28, "mu": 0.1, "blocks": ["6"], "shaping": "centered-ranks"},
    "phase1": {"optimizer": {"name": "adam", "lr": 0.2, "weight_decay": 0.0}, "batch_size": 64},
    "run": {"epochs": 36},
    "phase2": {"after_steps": 536, "estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"},
               "optimizer": {"name": "adam", "lr": 5e-3, "weight_decay": 0.0},
               "schedule": {"name": "cosine", "warmup_epochs": 0.0}, "batch_size": 64},
}


# The digits default (docs/efficiency.md, "The digits default"): two phases, both on 64-image batches. Phase 1:
# subspace CGE on the last layer (blackbox_zo/subspace.py): CGE along e_k v_j^T, v_j the top-16 right singular
# vectors of the batch's inputs to the linear layer [H | 1] (160 directions + the base: 161 queries a step), Adam
# 0.5 (`phase1`) with the run's cosine over the phase, 186 steps (29,946 queries). Phase 2: the recipe's Sparse-CGE
# on every layer with Adam 5e-3 (cosine over the 78 steps left of 12 epochs). The run's own optimizer, schedule
# and batch size stay the recipe's, so DeepZero's recipe is four --set values away: estimator=cge,
# estimator.mu=0.005, run.epochs=10, phase2=none.
SUBSPACE_THEN_SPARSE_CGE: dict[str, Any] = {
    **DEEPZERO_RECIPE,
    "estimator": {"kind": "subspace-cge", "rank": 16, "mu": 3e-3, "scheme": "forward", "blocks": ["6"]},
    "phase1": {"optimizer": {"name": "adam", "lr": 0.5, "weight_decay": 0.0}, "batch_size": 64},
    "run": {"epochs": 12},
    "phase2": {"after_steps": 186, "estimator": {"kind": "cge", "mu": 5e-3, "scheme": "forward"},
               "optimizer": {"name": "adam", "lr": 5e-3, "weight_decay": 0.0},
               "schedule": {"name": "cosine", "warmup_epochs": 0.0}, "batch_size": 64},
}


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): images [N, 1, 8, 8] in [0, 1], a fixed stratified split.

    The data are scikit-learn's bundled digits (`sklearn.datasets.load_digits`) and the split is
    `train_test_split(..., stratify=y, random_state=seed)`, both computed here with numpy: importing
    scikit-learn costs about 2 CPU seconds, a tenth of a whole default digits run
    (docs/performance.md). tests/test_digits_data.py checks both against scikit-learn itself.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = _digits_table()
    x = torch.tensor(data[:, :-1].reshape(-1, 8, 8), dtype=torch.float32).unsqueeze(1) / 16.0
    target = data[:, -1].astype(int)
    y = torch.tensor(target, dtype=torch.long)
    idx_train, idx_test = stratified_split(target, test_fraction, seed)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _digits_table() -> np.ndarray:
    """scikit-learn's digits.csv.gz ([1797, 65]: 64 pixels and the label per row), read as load_digits
    reads it, located without importing scikit-learn (find_spec does not run the package)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data ship with scikit-learn: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        return np.loadtxt(f, delimiter=",")


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of a stratified random split of labels `y`, the same as
    scikit-learn's `train_test_split(stratify=y, test_size=test_fraction, random_state=seed)`
    (StratifiedShuffleSplit, scikit-learn 1.3 to 1.9): the same numpy RandomState draws in the
    same order, so the same split."""
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_index, counts = np.unique(y, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(classes):
        raise ValueError(f"test_fraction={test_fraction} leaves a class without a train or test example")
    class_indices = np.split(np.argsort(y_index, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's `utils.extmath._approximate_mode`: per-class counts of a stratified draw,
    floor of the proportional share, the rest given by largest remainder, ties broken by `rng`."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def make_digits_cnn(width: int = 8) -> nn.Sequential:
    """conv 1->w 3x3, ReLU, conv w->2w 3x3, ReLU, max-pool 2, linear 2w*16 -> 10 (w=8: 3,818 parameters).

    An nn.Sequential, so feature reuse can treat each layer as a stage.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 10),
    )


def freeze_leading_convs(module: nn.Sequential, count: int) -> None:
    """requires_grad=False on the first `count` convolutions: they leave the parameter space the
    oracle and the trainer see, and keep their seeded initialisation (random features)."""
    convs = [m for m in module if isinstance(m, nn.Conv2d)]
    if not 0 <= count <= len(convs):
        raise ValueError(f"model.frozen_convs must be in [0, {len(convs)}], got {count}")
    for conv in convs[:count]:
        conv.requires_grad_(False)


class DigitsModelConfig(Strict):
    """The `model` section of digits: the CNN's width."""

    width: int = Field(8, ge=1, description="channels of the first conv (the second has 2x): 8 gives 3,818 "
                       "parameters")
    frozen_convs: int = Field(0, ge=0, le=2, description="leading convolutions kept at their seeded initialisation "
                              "(not trained, not queried): 0 trains all, 1 the second conv and the linear layer, 2 "
                              "the linear layer only; a population then computes the frozen prefix once per batch")


class DigitsConfig(TrainConfig):
    """digits: 8x8 images (data), ZO-GraSP sparsity, the CNN (model)."""

    data: DataConfig = Field(default_factory=DataConfig, description="mini-batches and the train/test split")
    sparsity: SparsityField = None
    model: DigitsModelConfig = Field(default_factory=DigitsModelConfig, description="the CNN")


def accuracy(module: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


class DigitsProblem(Problem):
    name = "digits"
    description = "8x8 digits (scikit-learn, bundled), small CNN, trained by loss queries only"
    config_model = DigitsConfig

    def default_config(self) -> dict[str, Any]:
        # Two phases (SUBSPACE_THEN_SPARSE_CGE; docs/efficiency.md, the digits-w8-run rows): subspace CGE on the
        # last layer (161 queries a step, the conv layers run once per batch) to 30K queries, then DeepZero's
        # Sparse-CGE (ZO-GraSP at init, layer-wise ratios at 90% sparsity, a fresh set every epoch) with Adam 5e-3
        # to the end of 12 epochs of 64 images (62,546 queries): 0.94 within 9K to 12K queries (the previous
        # default, ES on the last layer then Sparse-CGE: 50K to 55K), 0.967 to 0.975 at the end on seeds 0 to 2.
        # data.batch_size 16 is the recipe's (a one-phase run).
        return {
            "problem": "digits",
            **{k: v for k, v in SUBSPACE_THEN_SPARSE_CGE.items()},
            "data": {"batch_size": 16, "seed": 0},
            # One intra-op thread: the ops are small, and on a shared 2-core machine torch's default
            # 2 threads made the same run 12x slower (279 s vs 23 s, identical result; docs/sparsity.md).
            "run": {"epochs": 12, "seed": 0, "threads": 1},
        }

    def setup(self, config: DigitsConfig) -> TrainingSetup:
        x_tr, y_tr, x_te, y_te = load_digits_split(config.data.seed)
        torch.manual_seed(config.run.seed)
        module = make_digits_cnn(config.model.width)
        freeze_leading_convs(module, config.model.frozen_convs)
        oracle = ModelLossOracle(module, nn.functional.cross_entropy)

        def evaluate(m: nn.Module) -> dict[str, float]:
            with torch.no_grad():
                logits = m(x_te)
                return {
                    "test_acc": float((logits.argmax(1) == y_te).float().mean()),
                    "test_loss": float(nn.functional.cross_entropy(logits, y_te)),
                }

        def fo_loss(m: nn.Module, batch) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(m(x), y)

        coord_sampler, extras = None, {}
        sparsity = active_sparsity(config)  # Sparse-CGE only: the config has no sparsity for other estimators
        if sparsity is not None:
            # DeepZero: ZO-GraSP on a balanced batch at init (queries charged to `prune`) -> LPRs -> Sparse-CGE.
            idx = balanced_indices(y_tr, sparsity.samples_per_class, seed=config.run.seed)
            coord_sampler, extras["sparsity"] = build_sparse_sampler(
                oracle, oracle.initial_theta(), (x_tr[idx], y_tr[idx]), sparsity, seed=config.run.seed)
        self._sparsity_report = extras.get("sparsity")

        return TrainingSetup(
            oracle=oracle,
            train_batches=TensorBatches(x_tr, y_tr, batch_size=config.data.batch_size, seed=config.run.seed),
            module=module,
            evaluate=evaluate,
            fo_loss=fo_loss,
            coord_sampler=coord_sampler,
            extras=extras,
        )

    def report(self, run_dir, summary: dict[str, Any]) -> None:
        """sparsity.json: the pruning method, its query cost and the layer-wise ratios used."""
        report = getattr(self, "_sparsity_report", None)
        if report is not None:
            atomic_write_text(Path(run_dir) / "sparsity.json", json.dumps(report, indent=2) + "\n")
