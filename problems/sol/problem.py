"""The `sol` problem: solver-in-the-loop for any registered simulator (DeepZero Appx. H, eq. (A3)).

`blackbox-zo train sol --set sol.simulator=NAME` trains a corrector through the simulator
NAME (registry `SIMULATORS`, entry-point group `blackbox_zo.simulators`) by loss values
only: CGE (+ optional DeepZero gradient sparsity) and Adam. The reference trajectories come
from a file (`sol.data`, format in problems/sol/data.py and docs/sol.md) or from the
simulator's high-fidelity twin. `--set estimator=autograd` is FO-SOL, for simulators that
declare themselves differentiable; for the others it is refused in one line.

The loss is eq. (A3) with a per-entry weight (`sol.loss_weight`): ``inverse-variance``
divides each channel's (or vector entry's) squared error by its variance over the training
frames, as the reference code scales each velocity component; ``uniform`` weighs every
valid entry alike. A rollout that diverges counts a capped loss (`sol.divergence`,
docs/sol.md#diverging-rollouts).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

import torch
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from blackbox_zo.config import ConfigError, SparsityField, Strict, TrainConfig, active_sparsity
from blackbox_zo.problem import Problem, ProblemSetupError, TrainingSetup
from blackbox_zo.registry import SIMULATORS
from blackbox_zo.sparsity import build_sparse_sampler
from oracles.simulator import SolverInTheLoopOracle, is_differentiable, make_simulator, unrolled_loss, weighted_mse

from .corrector import build_corrector, unshrunk
from .data import ReferenceDataError, WindowBatches, normalisation, reference_runs
from .methods import evaluate_mae, warm_start_non
from .report import plot_test_run, report_single_run

__all__ = ["SolLoopSettings", "SolSettings", "SolConfig", "SolProblem", "loss_weight", "step_cap", "build_sol"]


class SolLoopSettings(Strict):
    """What every solver-in-the-loop problem sets: eq. (A3)'s windows, the corrector's start, the
    oracle's batching and divergence handling, the test rollout. `sol` and its presets (the
    wake flow's `wake` section) declare these fields, each with its own defaults."""

    unroll: int = Field(8, ge=1, description="n, the unrolled solver steps of eq. (A3)")
    windows: int = Field(4, ge=1, description="(run, start frame) windows per step")
    batches_per_epoch: Optional[int] = Field(
        10, ge=1, description="cap on steps per epoch (None: all windows); the sparse coordinate set is redrawn "
                              "every sparsity.resample_every_epochs epochs, so this sets how often")
    eval_steps: Optional[int] = Field(None, ge=1, description="test rollout length (None: all recorded frames)")
    out_init_scale: float = Field(1e-2, gt=0, description="scale of the last layer at init: corrections compound "
                                                          "over a rollout")
    max_batch: int = Field(512, ge=1, description="states simulated at once by the oracle")
    prune_windows: int = Field(8, ge=1, description="windows of the ZO-GraSP batch")
    grasp_at: Literal["default-scale", "as-initialised"] = Field(
        "as-initialised", description="where ZO-GraSP scores the corrector for its layer ratios: with the last "
        "layer at its default initialisation scale (out_init_scale undone), or as initialised (the near-zero last "
        "layer then scores ~0 and is pruned entirely; docs/sol.md)")
    divergence: Literal["cap", "nan"] = Field(
        "cap", description="a diverged rollout: cap (a capped loss, counted) or nan (run.nan_policy decides)")
    divergence_factor: float = Field(10.0, gt=0, description="step cap = this x the loss of the all-zero state")
    cache_dir: str = Field("data_cache", description="where the reference data are cached")
    warm_start: Literal["none", "non"] = Field(
        "none", description="non: pre-train the corrector as NON does (first-order on the corrector alone, on "
        "pre-generated one-step pairs; the simulator is never differentiated) before the run's first step "
        "(docs/sol.md#warm-start)")
    warm_start_steps: Optional[int] = Field(
        None, ge=0, description="NON Adam steps of the warm start (None: the run's steps, as the NON method)")
    warm_start_batch: Optional[int] = Field(
        None, ge=1, description="pairs per warm-start step (None: windows x unroll, as the NON method)")
    warm_start_lr: Optional[float] = Field(None, gt=0, description="warm-start Adam lr (None: optimizer.lr, "
                                                                   "as the NON method)")


class SolSettings(SolLoopSettings):
    """The `sol` section of the config (`--set sol.unroll=8`)."""

    simulator: str = Field("burgers-v1", description="a registered simulator (blackbox-zo list: simulators)")
    simulator_options: dict[str, Any] = Field(default_factory=dict,
                                              description="keyword arguments of the simulator's factory")
    data: Optional[str] = Field(None, description="reference trajectories, .npz (docs/sol.md); None: the "
                                                  "simulator's high-fidelity twin")
    corrector: Literal["auto", "conv", "mlp"] = Field(
        "auto", description="auto: convolutional for grid states (channels, *grid), an MLP for vectors (D,)")
    width: int = Field(8, ge=1, le=4096, description="hidden channels (conv) or units (MLP)")
    depth: int = Field(2, ge=0, le=16, description="hidden layers")
    kernel: int = Field(5, ge=1, le=31, description="convolution kernel size (odd)")
    padding: Literal["auto", "zeros", "circular", "replicate"] = Field(
        "auto", description="convolution padding; auto: the simulator's `padding` (zeros if it declares none)")
    conserve: Optional[bool] = Field(
        None, description="zero-mean correction per channel (conserves each channel's total); None: the simulator's "
                          "`conservative` (False if it declares none)")
    loss_weight: Literal["inverse-variance", "uniform"] = Field(
        "inverse-variance", description="eq. (A3)'s per-entry weight: 1/variance of each channel, or uniform")

    @field_validator("simulator")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name in SIMULATORS:
            return name
        names = SIMULATORS.names()
        failed = f" ({name!r} failed to load: {SIMULATORS.errors[name]})" if name in SIMULATORS.errors else ""
        raise PydanticCustomError("unknown_simulator", "no simulator {name}{failed}; registered: {known}",
                                  {"name": repr(name), "failed": failed, "known": ", ".join(names) or "(none)"})

    @field_validator("kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise PydanticCustomError("odd_kernel", "kernel must be odd, got {k}", {"k": k})
        return k


class SolConfig(TrainConfig):
    """sol: no data section (the data are reference windows: sol.*), DeepZero sparsity."""

    sparsity: SparsityField = None
    sol: SolSettings = Field(default_factory=SolSettings, description="simulator, reference data, corrector, windows")


def loss_weight(kind: str, state_std: Tensor, state_shape: tuple[int, ...], mask: Tensor | None) -> Tensor | None:
    """Per-entry weight of eq. (A3) [*state_shape] (None: plain mean)."""
    if kind == "uniform":
        return None if mask is None else mask.float()
    if len(state_shape) >= 2:  # per channel
        w = (1.0 / state_std.pow(2)).view(-1, *[1] * (len(state_shape) - 1)).expand(state_shape).clone()
    else:
        w = 1.0 / state_std.pow(2).reshape(state_shape)
    return w if mask is None else w * mask


def step_cap(frames: Tensor, weight: Tensor | None, factor: float) -> float:
    """The divergence cap of one unrolled step: `factor` times the mean loss of predicting the
    all-zero state (a state that far off has lost the flow)."""
    flat = frames.reshape(-1, *frames.shape[2:])
    zero = float(weighted_mse(flat, None if weight is None else weight.to(flat)).mean())
    return factor * (zero if zero > 0 else 1.0)


def build_sol(config: SolConfig, progress: bool = True, log=print, first_order: bool = False) -> dict[str, Any]:
    """The simulator, its reference runs and the corrector, oracle pieces and scales of a config.

    Everything the problem, the experiment and the report share; ProblemSetupError (one line)
    for anything the user can fix, and for `first_order` (FO-SOL) with a simulator that does not
    declare itself differentiable.
    """
    s = config.sol
    try:
        sim = make_simulator(s.simulator, **s.simulator_options)
    except Exception as exc:  # the factory is plug-in code: one line naming the settings
        raise ProblemSetupError(f"cannot build simulator {s.simulator!r} with sol.simulator_options="
                                f"{s.simulator_options}: {type(exc).__name__}: {exc}") from exc
    if first_order and not is_differentiable(sim):  # refused before any data is made
        raise ProblemSetupError(
            f"FO-SOL (estimator=autograd) needs a differentiable simulator; {s.simulator!r} declares "
            "differentiable=False, so there is no gradient to backpropagate: train it by loss values "
            "(the default estimator=cge, ZO-SOL)")
    try:
        runs, info = reference_runs(sim, s.simulator, s.simulator_options, s.data, s.cache_dir, progress, log)
    except ReferenceDataError as exc:
        raise ProblemSetupError(str(exc)) from exc
    state_shape = tuple(sim.state_shape)
    train, train_cond = runs.split(test=False)
    test, test_cond = runs.split(test=True)
    mask = getattr(sim, "mask", None)
    if mask is not None and tuple(mask.shape) != state_shape:
        raise ProblemSetupError(f"simulator {s.simulator!r}: mask has shape {tuple(mask.shape)}, state_shape "
                                f"{state_shape}")
    scales = normalisation(train, train_cond, mask)
    weight = loss_weight(s.loss_weight, scales["state_std"], state_shape, mask)
    cap = step_cap(train, weight, s.divergence_factor)
    padding = s.padding if s.padding != "auto" else getattr(sim, "padding", "zeros")
    conserve = bool(getattr(sim, "conservative", False)) if s.conserve is None else s.conserve
    n_cond = 1 if train_cond.dim() == 1 else train_cond.shape[1]

    def new_corrector(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        try:
            return build_corrector(state_shape, n_cond, kind=s.corrector, width=s.width, depth=s.depth,
                                   kernel=s.kernel, padding=padding, out_init_scale=s.out_init_scale,
                                   state_scale=scales["state_std"], cond_scale=scales["cond_std"], mask=mask,
                                   conserve=conserve)
        except ValueError as exc:
            raise ProblemSetupError(f"sol.corrector={s.corrector}: {exc}") from exc

    return {"simulator": sim, "runs": runs, "data_info": info, "train": (train, train_cond),
            "test": (test, test_cond), "mask": mask, "scales": scales, "weight": weight, "step_cap": cap,
            "new_corrector": new_corrector, "differentiable": is_differentiable(sim)}


class SolProblem(Problem):
    """The generic solver-in-the-loop problem; a preset (the wake flow) is a subclass that names its
    own config section and builds its own simulator, reference data and corrector (`build`), and
    shares everything else: the oracle, the batches, sparsity, FO-SOL, the report, the experiment."""

    name = "sol"
    description = "solver-in-the-loop for any registered simulator (sol.simulator=NAME): corrector by loss values"
    config_model = SolConfig
    headline_metric = "test_mae"
    section = "sol"  # the config section holding the SolLoopSettings fields
    condition_label = "cond"  # how a test run's condition is labelled in tables ("Re" for the wake flow)
    test_run_plot = "test_run.png"
    paper_scale: Optional[dict[str, Any]] = None  # a preset's `experiment --paper-scale` settings
    # The experiment's SRC / NON / FO-SOL / ZO-SOL / NON+ZO-SOL run on the defaults <- these (a preset whose
    # default method is not DeepZero's ZO-SOL pins ZO-SOL here; `sol`'s default is ZO-SOL itself)
    experiment_settings: dict[str, Any] = {}
    default_method: Optional[str] = None  # the experiment's name for the default run when it is not ZO-SOL
    # `experiment --quick`: few steps of everything, on the simulator's own `quick_options` (`quick_overrides`)
    quick: tuple[str, ...] = ("sol.unroll=2", "sol.windows=2", "sol.batches_per_epoch=3", "sol.prune_windows=2",
                              "sol.width=4", "sol.depth=1", "run.epochs=2", "run.eval_every_epochs=2")

    def default_config(self) -> dict[str, Any]:
        return {
            "problem": "sol",
            "estimator": {"kind": "cge", "mu": 1e-3, "scheme": "forward"},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "schedule": {"name": "cosine", "min_lr_ratio": 0.1},
            "sparsity": {"enabled": False, "method": "random", "sparsity": 0.9, "q": 64,
                         "resample_every_epochs": 1},
            "run": {"epochs": 40, "seed": 0, "threads": 1, "eval_every_epochs": 10},
            "sol": {},
        }

    # -- what a preset overrides -------------------------------------------------------------

    def settings(self, config) -> SolLoopSettings:
        return getattr(config, self.section)

    def simulator_name(self, config) -> str:
        return config.sol.simulator

    def quick_overrides(self, config) -> list[str]:
        quick_opts = getattr(SIMULATORS.get(config.sol.simulator), "quick_options", {}) or {}
        return list(self.quick) + [f"sol.simulator_options.{k}={json.dumps(v)}" for k, v in quick_opts.items()]

    def differentiable(self, config) -> bool:
        """Whether FO-SOL may run: the simulator declares differentiable=True (checked before any data)."""
        try:
            sim = make_simulator(config.sol.simulator, **config.sol.simulator_options)
        except Exception as exc:  # the factory is plug-in code: one line naming the settings
            raise ConfigError(f"cannot build simulator {config.sol.simulator!r} with sol.simulator_options="
                              f"{config.sol.simulator_options}: {type(exc).__name__}: {exc}") from exc
        return is_differentiable(sim)

    def build(self, config, progress: bool = True, log=print, first_order: bool = False) -> dict[str, Any]:
        """The simulator, the reference runs, the corrector factory and the loss pieces (`build_sol`)."""
        return build_sol(config, progress, log=log, first_order=first_order)

    def test_run_index(self, runs: int) -> int:
        """Which test run the pictures show."""
        return 0

    def plot_test_run(self, rows: dict[str, Tensor], run_label: str, path, title: str) -> None:
        """One test run as each method rolled it out; rows: {name: trajectory [steps+1, *state]}."""
        plot_test_run(rows, path, title=f"{title}: test run {run_label}")

    # -- shared ------------------------------------------------------------------------------

    def setup(self, config, progress: bool | None = None) -> TrainingSetup:
        s = self.settings(config)
        progress = config.run.progress if progress is None else progress
        first_order = config.estimator.kind == "autograd"
        parts = self.build(config, progress, first_order=first_order)
        sim = parts["simulator"]
        corrector = parts["new_corrector"](config.run.seed)
        weight, cap = parts["weight"], parts["step_cap"]
        train, train_cond = parts["train"]
        try:
            batches = WindowBatches(train, train_cond, s.unroll, s.windows, seed=config.run.seed,
                                    batches_per_epoch=s.batches_per_epoch)
        except ValueError as exc:
            raise ProblemSetupError(f"{self.section}.unroll / {self.section}.windows: {exc}") from exc
        warm = None
        if s.warm_start == "non":  # before the oracle exists: its initial theta is the warm-started corrector
            warm = warm_start_non(corrector, sim, train, train_cond, weight, steps=(
                config.run.epochs * batches.num_batches(0) if s.warm_start_steps is None else s.warm_start_steps),
                lr=config.optimizer.lr if s.warm_start_lr is None else s.warm_start_lr,
                batch_size=s.windows * s.unroll if s.warm_start_batch is None else s.warm_start_batch,
                seed=config.run.seed, max_batch=s.max_batch, progress=progress)
        oracle = SolverInTheLoopOracle(sim, corrector, weight=weight, max_batch=s.max_batch, step_cap=cap,
                                       on_divergence=s.divergence)
        oracle.name = f"sol:{self.simulator_name(config)}"
        test, test_cond = parts["test"]
        mask = parts["mask"]

        def evaluate(m: nn.Module) -> dict[str, float]:
            mae, _ = evaluate_mae(sim, m, test, test_cond, mask, s.eval_steps)
            return {"test_mae": float(mae.mean()), "test_mae_std": float(mae.std(unbiased=False))}

        fo_loss = None
        if parts["differentiable"]:
            def fo_loss(m: nn.Module, batch) -> Tensor:  # FO-SOL: eq. (A3) backpropagated through the simulator
                return unrolled_loss(sim, m, batch.start, batch.targets, batch.conditions, weight, cap).mean()

        coord_sampler, extras = None, dict(parts)
        sparsity = active_sparsity(config)
        if sparsity is not None and not first_order:
            # DeepZero: ZO-GraSP at init on one fixed batch (queries charged to `prune`) -> LPRs -> Sparse-CGE.
            gen = torch.Generator().manual_seed(config.run.seed + 1)
            pick = batches.index[torch.randperm(batches.index.shape[0], generator=gen)[: s.prune_windows]]
            probe = oracle.initial_theta()
            if s.grasp_at == "default-scale" and warm is None:  # a warm-started last layer is no longer shrunk  # DeepZero uses the scores for layer ratios only (then random
                probe = oracle.space.flatten_module(unshrunk(corrector, s.out_init_scale))  # coordinates in each)
            coord_sampler, extras["sparsity"] = build_sparse_sampler(
                oracle, probe, batches.windows_at(pick), sparsity, seed=config.run.seed)
        if warm is not None:
            extras["warm_start"] = warm
        return TrainingSetup(oracle=oracle, train_batches=batches, module=corrector, evaluate=evaluate,
                             fo_loss=fo_loss, coord_sampler=coord_sampler, extras=extras,
                             summary=None if warm is None else (lambda: {"warm_start": warm}))

    def report(self, run_dir, summary: dict[str, Any]) -> None:
        """Test MAE of this run's corrector next to SRC, and a picture of one test run."""
        report_single_run(self, run_dir)
