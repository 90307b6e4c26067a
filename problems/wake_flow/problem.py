"""The `wake-flow` problem: ZO-SOL (DeepZero Sec. 6.2, Appx. H) through the trainer.

`blackbox-zo train wake-flow` trains the corrector by loss values of eq. (A3) only
(CGE + DeepZero gradient sparsity, Adam); `--set estimator=autograd` is FO-SOL, the same
loss backpropagated through PhiFlow (a labelled first-order reference). The four-method
comparison of Fig. 6 is the `wake-flow` experiment (`problems.wake_flow.experiment`).

CPU default vs paper scale (settings, see `PAPER_SCALE`): the defaults keep the paper's
grids (32x64 low fidelity, 64x128 high fidelity) and Reynolds numbers, but record 200
instead of 500 frames, use a 506-parameter corrector instead of 56,898, unroll n = 4
instead of 16 steps, W = 2 windows per step, Adam lr 1e-3 with a cosine decay (paper:
1e-4) and 800 steps (80 "epochs" of 10 steps, the sparse coordinates redrawn every epoch)
instead of ten full epochs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from blackbox_zo.config import SparsityField, Strict, TrainConfig, active_sparsity
from blackbox_zo.problem import Problem, TrainingSetup
from blackbox_zo.sparsity import build_sparse_sampler
from oracles.simulator import SolverInTheLoopOracle, unrolled_loss
from oracles.wake_flow import shared_simulator
from problems.sol.corrector import unshrunk

from .data import PAPER_TEST_RE, PAPER_TRAIN_RE, WakeData, WakeDataSpec, WindowBatches, load_or_generate
from .methods import evaluate_mae
from .model import CORRECTOR_SIZES, WakeCorrector, make_corrector
from .report import report_single_run

__all__ = ["WakeSettings", "WakeFlowConfig", "WakeFlowProblem", "PAPER_SCALE", "loss_weight", "data_spec"]

PositiveFloat = Annotated[float, Field(gt=0)]


class WakeSettings(Strict):
    """The wake-flow section of the config (`--set wake.unroll=8`)."""

    lo_nx: int = Field(32, ge=8, le=512, description="low-fidelity cells along x (y has twice as many)")
    hifi_factor: int = Field(2, ge=1, le=8, description="high fidelity is this much finer (2: 64x128, 4: 128x256)")
    skip_steps: int = Field(2000, ge=0, description="high-fidelity transient dropped before recording")
    record_steps: int = Field(200, ge=2, description="recorded frames per run after the transient (paper: 500)")
    train_re: tuple[PositiveFloat, ...] = Field(PAPER_TRAIN_RE, min_length=1,
                                                description="Reynolds numbers of the training simulations (paper's)")
    test_re: tuple[PositiveFloat, ...] = Field(PAPER_TEST_RE, min_length=1,
                                               description="Reynolds numbers of the held-out test simulations")
    corrector: Literal["paper", "medium", "small", "tiny"] = Field(
        "tiny", description="paper: the reference's 56,898-parameter net; tiny: conv 3->4->2 (506); small: 3->8->2")
    out_init_scale: float = Field(
        1e-3, gt=0, description="scale of the last layer at init: corrections compound over a 200-step rollout, "
                                "so a default-initialised corrector (scale 1) starts far worse than no correction")
    unroll: int = Field(4, ge=1, description="n, the unrolled solver steps of eq. (A3) (paper: 16)")
    windows: int = Field(2, ge=1, description="(simulation, start frame) windows per step")
    batches_per_epoch: Optional[int] = Field(
        10, ge=1, description="cap on steps per epoch (None: all windows); the sparse coordinate set is redrawn "
                              "every sparsity.resample_every_epochs epochs, so this sets how often")
    eval_steps: Optional[int] = Field(None, ge=1, description="test rollout length (None: all recorded frames)")
    max_batch: int = Field(64, ge=1, description="states simulated at once by the oracle (per-state cost is "
                                                  "lowest around 32-64 at 32x64, benchmarks/bench_sol.py)")
    prune_windows: int = Field(8, ge=1, description="windows of the ZO-GraSP batch")
    grasp_at: Literal["default-scale", "as-initialised"] = Field(
        "as-initialised", description="sparsity.method=zo-grasp: score the corrector for the layer ratios with its "
        "last layer at the default initialisation scale (out_init_scale undone), or as initialised (the near-zero "
        "last layer then gets no coordinates at all; docs/wake-flow.md)")
    cg_tolerance: float = Field(1e-5, gt=0, lt=1, description="relative tolerance of the pressure solve "
                                "(conjugate gradient)")
    cache_dir: str = Field("data_cache", description="where the generated high-fidelity data are cached")


class WakeFlowConfig(TrainConfig):
    """wake-flow: no data section (the data are simulated windows: wake.*), DeepZero sparsity."""

    sparsity: SparsityField = None
    wake: WakeSettings = Field(default_factory=WakeSettings, description="simulation, corrector, windows")


# The paper-scale configuration (DeepZero Appx. H; a GPU job): `--paper-scale` of the
# experiment, or --set each of these. The paper's ten epochs = 10 x (6 runs x 484 windows / 6).
PAPER_SCALE: dict[str, Any] = {
    "wake.record_steps": 500,
    "wake.corrector": "paper",
    "wake.unroll": 16,
    "wake.windows": 6,
    "wake.batches_per_epoch": None,
    "optimizer.lr": 1e-4,
    "schedule.name": "constant",
    "run.epochs": 10,
    "run.eval_every_epochs": 1,
    "sparsity.sparsity": 0.95,
    "sparsity.resample_every_epochs": 1,
}


def data_spec(w: WakeSettings) -> WakeDataSpec:
    return WakeDataSpec(lo_nx=w.lo_nx, lo_ny=2 * w.lo_nx, hifi_factor=w.hifi_factor, skip_steps=w.skip_steps,
                        record_steps=w.record_steps, train_re=tuple(w.train_re), test_re=tuple(w.test_re),
                        cg_tolerance=w.cg_tolerance)


def loss_weight(mask: Tensor, stats: dict[str, float]) -> Tensor:
    """Per-entry weight of eq. (A3): 1/std^2 of each velocity component, 0 on the padding
    (the reference divides each component's error by its std before the L2 loss)."""
    scale = torch.tensor([1.0 / stats["std_ux"] ** 2, 1.0 / stats["std_uy"] ** 2]).view(2, 1, 1)
    return mask * scale


def build_corrector(w: WakeSettings, data: WakeData, seed: int) -> WakeCorrector:
    torch.manual_seed(seed)
    corrector = make_corrector(w.corrector, out_init_scale=w.out_init_scale)
    corrector.set_normalisation(data.stats["std_ux"], data.stats["std_uy"], data.stats["std_re"])
    return corrector


class WakeFlowProblem(Problem):
    name = "wake-flow"
    description = "solver-in-the-loop wake flow (PhiFlow 3): corrector trained through the simulator by loss values"
    config_model = WakeFlowConfig
    headline_metric = "test_mae"

    def default_config(self) -> dict[str, Any]:
        return {
            "problem": "wake-flow",
            "estimator": {"kind": "cge", "mu": 1e-3, "scheme": "forward"},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "schedule": {"name": "cosine", "min_lr_ratio": 0.1},
            # 95% gradient sparsity (DeepZero Sec. 6.2) with uniform layer-wise ratios: ZO-GraSP's
            # ratios (method=zo-grasp) prune the near-zero-initialised output layer entirely
            # (keep 0 of 200 weights), so Sparse-CGE could never train it; see docs/wake-flow.md.
            "sparsity": {"enabled": True, "method": "random", "sparsity": 0.95, "q": 64,
                         "resample_every_epochs": 1},
            "run": {"epochs": 80, "seed": 0, "threads": 2, "eval_every_epochs": 80},
            "wake": {},
        }

    def setup(self, config: WakeFlowConfig, progress: bool | None = None) -> TrainingSetup:
        w = config.wake
        progress = config.run.progress if progress is None else progress
        spec = data_spec(w)
        data = load_or_generate(spec, w.cache_dir, progress=progress)
        sim = shared_simulator(spec.lo_geometry, min_reynolds=spec.min_reynolds, cg_tolerance=w.cg_tolerance)
        corrector = build_corrector(w, data, config.run.seed)
        weight = loss_weight(sim.mask, data.stats)
        oracle = SolverInTheLoopOracle(sim, corrector, weight=weight, max_batch=w.max_batch)
        batches = WindowBatches(data.train, data.train_re, w.unroll, w.windows, seed=config.run.seed,
                                batches_per_epoch=w.batches_per_epoch)

        def evaluate(m: nn.Module) -> dict[str, float]:
            mae, _ = evaluate_mae(sim, m, data.test, data.test_re, sim.mask, w.eval_steps)
            return {"test_mae": float(mae.mean()), "test_mae_std": float(mae.std(unbiased=False))}

        def fo_loss(m: nn.Module, batch) -> Tensor:  # FO-SOL: eq. (A3) backpropagated through PhiFlow
            return unrolled_loss(sim, m, batch.start, batch.targets, batch.conditions, weight).mean()

        coord_sampler, extras = None, {"data": data, "simulator": sim, "weight": weight}
        sparsity = active_sparsity(config)
        if sparsity is not None:
            # DeepZero: ZO-GraSP at init on one fixed batch (queries charged to `prune`) -> LPRs -> Sparse-CGE.
            gen = torch.Generator().manual_seed(config.run.seed + 1)
            pick = batches.index[torch.randperm(batches.index.shape[0], generator=gen)[: w.prune_windows]]
            probe = oracle.initial_theta()
            if w.grasp_at == "default-scale":  # the scores set layer ratios only; coordinates are random in each
                probe = oracle.space.flatten_module(unshrunk(corrector, w.out_init_scale))
            coord_sampler, extras["sparsity"] = build_sparse_sampler(
                oracle, probe, batches.windows_at(pick), sparsity, seed=config.run.seed)

        return TrainingSetup(oracle=oracle, train_batches=batches, module=corrector, evaluate=evaluate,
                             fo_loss=fo_loss, coord_sampler=coord_sampler, extras=extras)

    def report(self, run_dir, summary: dict[str, Any]) -> None:
        """Test MAE of this run's corrector next to SRC, and a vorticity strip (PNG)."""
        report_single_run(self, run_dir)


assert set(CORRECTOR_SIZES) == {"paper", "medium", "small", "tiny"}  # keep WakeSettings.corrector in sync
