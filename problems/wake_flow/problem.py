"""The `wake-flow` problem: a preset of the generic `sol` problem (DeepZero Sec. 6.2, Appx. H).

`blackbox-zo train wake-flow` is `problems.sol.SolProblem` on the PhiFlow wake flow, with the
wake flow's own settings section (`wake.*`), data (the high-fidelity runs per Reynolds number,
cached, `problems.wake_flow.data`), corrector (the reference code's network,
`problems.wake_flow.model`) and loss weight (1/std^2 of each velocity component); the oracle,
the window batches, DeepZero sparsity, FO-SOL (`--set estimator=autograd`, backpropagated
through PhiFlow), the report and the four-method experiment are the generic ones.

CPU default vs paper scale (settings, see `PAPER_SCALE`): the defaults keep the paper's
grids (32x64 low fidelity, 64x128 high fidelity) and Reynolds numbers, but record 200
instead of 500 frames, use a 506-parameter corrector instead of 56,898, unroll n = 4
instead of 16 steps, W = 2 windows per step, Adam lr 1e-3 with a cosine decay (paper:
1e-4).

The default method is the one that won the wake-tiny row of the efficiency study per query
(docs/efficiency.md): NON's warm start (800 steps, no queries), then an evolution strategy
(antithetic Gaussian pairs, centered ranks; `DEFAULT_METHOD`) for 1,600 steps of 16 queries
(160 "epochs" of 10 steps), 25,600 queries in all. DeepZero's ZO-SOL (95% random gradient
sparsity, forward Sparse-CGE, 800 steps of 32 queries: the same 25,600) is `ZO_SOL`: the
experiment's ZO-SOL, NON+ZO-SOL and FO-SOL run on it, and `--set` reaches it from `train`
(docs/wake-flow.md).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from blackbox_zo.config import SparsityField, TrainConfig, active_sparsity, deep_merge
from oracles.wake_flow import WakeFlowGeometry, shared_simulator
from problems.sol.problem import SolLoopSettings, SolProblem, step_cap

from .data import PAPER_TEST_RE, PAPER_TRAIN_RE, WakeData, WakeDataSpec, cache_path, load_or_generate
from .model import CORRECTOR_SIZES, WakeCorrector, make_corrector
from .report import plot_vorticity_strip

__all__ = ["WakeSettings", "WakeFlowConfig", "WakeFlowProblem", "PAPER_SCALE", "QUICK", "DEFAULT_METHOD", "ZO_SOL",
           "loss_weight", "data_spec"]

PositiveFloat = Annotated[float, Field(gt=0)]


class WakeSettings(SolLoopSettings):
    """The wake-flow section of the config (`--set wake.unroll=8`): the generic loop settings with
    the wake flow's defaults, then the flow's own."""

    unroll: int = Field(4, ge=1, description="n, the unrolled solver steps of eq. (A3) (paper: 16)")
    windows: int = Field(2, ge=1, description="(simulation, start frame) windows per step")
    out_init_scale: float = Field(
        1e-3, gt=0, description="scale of the last layer at init: corrections compound over a 200-step rollout, "
                                "so a default-initialised corrector (scale 1) starts far worse than no correction")
    max_batch: int = Field(64, ge=1, description="states simulated at once by the oracle (per-state cost is "
                                                  "lowest around 32-64 at 32x64, benchmarks/bench_sol.py)")
    cache_dir: str = Field("data_cache", description="where the generated high-fidelity data are cached")
    warm_start: Literal["none", "non"] = Field(
        "non", description="non (the default): pre-train the corrector as NON does (first-order on one-step pairs, "
        "the simulator never differentiated), then train in the loop from there; none: from the initial corrector "
        "(DeepZero's ZO-SOL). docs/wake-flow.md#warm-start-non-then-zo-sol")
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
    cg_tolerance: float = Field(1e-5, gt=0, lt=1, description="relative tolerance of the pressure solve "
                                "(conjugate gradient)")


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
    "wake.warm_start_steps": None,  # a NON warm start as long as the run (the default's 800 are the CPU run's)
}

# The default method (issue 16: the default is what wins its row of the efficiency study per query;
# docs/efficiency.md, wake-tiny, method `non+es`): from NON's corrector, an ES estimate of q = 8 antithetic
# Gaussian pairs (sigma = estimator.mu, centered-rank shaping) a step, 16 queries, every coordinate.
DEFAULT_METHOD: dict[str, Any] = {
    "estimator": {"kind": "es", "q": 8, "mu": 1e-3, "shaping": "centered-ranks"},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "schedule": {"name": "cosine", "min_lr_ratio": 0.1},
    # off; `--set sparsity.enabled=true` is DeepZero's 95% (uniform layer-wise ratios: ZO-GraSP's
    # (method=zo-grasp) prune the near-zero-initialised output layer entirely, docs/wake-flow.md)
    "sparsity": {"enabled": False, "sparsity": 0.95},
    "run": {"epochs": 160, "eval_every_epochs": 160},  # 1,600 steps x 16 queries = 25,600
    "wake": {"warm_start": "non", "warm_start_steps": 800},  # NON's own 800 steps, whatever the run's length
}

# DeepZero's ZO-SOL at the CPU scale (the default until the efficiency study): 95% random gradient sparsity
# (Sec. 6.2), forward Sparse-CGE, Adam 1e-3 cosine, 800 steps of 32 queries (25,600), a warm start (NON+ZO-SOL)
# as long as the run. Over the defaults, this is the old default exactly; the experiment's ZO-SOL,
# NON+ZO-SOL, FO-SOL and NON run on it (`SolProblem.experiment_settings`).
ZO_SOL: dict[str, Any] = {
    "estimator": {"kind": "cge", "mu": 1e-3, "scheme": "forward"},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "schedule": {"name": "cosine", "min_lr_ratio": 0.1},
    "sparsity": {"enabled": True, "method": "random", "sparsity": 0.95},
    "run": {"epochs": 80, "eval_every_epochs": 80},
    "wake": {"warm_start_steps": None},
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


# A smoke run (tests, a first look): tiny grids, a few steps of everything, a warm start as long as the
# run; with sparsity on (ZO-SOL), ZO-GraSP's q too (`quick_overrides`).
QUICK: tuple[str, ...] = (
    "wake.lo_nx=16", "wake.hifi_factor=2", "wake.skip_steps=40", "wake.record_steps=16", "wake.corrector=tiny",
    "wake.unroll=2", "wake.windows=2", "wake.batches_per_epoch=3", "wake.prune_windows=2", "run.epochs=2",
    "wake.warm_start_steps=null",
)
QUICK_SPARSE: tuple[str, ...] = ("sparsity.q=4",)


class WakeFlowProblem(SolProblem):
    name = "wake-flow"
    description = "solver-in-the-loop wake flow (PhiFlow 3): corrector trained through the simulator by loss values"
    config_model = WakeFlowConfig
    section = "wake"
    condition_label = "Re"
    test_run_plot = "vorticity.png"
    paper_scale = PAPER_SCALE
    quick = QUICK

    experiment_settings = ZO_SOL
    default_method = "NON+ES"

    def default_config(self) -> dict[str, Any]:
        config = super().default_config()  # `sol`'s sections, then the wake flow's default method over them
        del config["sol"]
        config["run"].update(threads=2)
        return {**deep_merge(config, DEFAULT_METHOD), "problem": "wake-flow"}

    def simulator_name(self, config) -> str:
        return "wake-flow-v1"

    def quick_overrides(self, config) -> list[str]:
        return list(self.quick) + (list(QUICK_SPARSE) if active_sparsity(config) is not None else [])

    def differentiable(self, config) -> bool:
        return True  # PhiFlow's torch backend: FO-SOL backpropagates through it

    def build(self, config: WakeFlowConfig, progress: bool = True, log=print, first_order: bool = False
              ) -> dict[str, Any]:
        """The wake flow's pieces for the generic loop: the low-fidelity PhiFlow simulator, the cached
        high-fidelity runs, the reference code's corrector and loss weight (differentiable: FO-SOL runs)."""
        w = config.wake
        spec = data_spec(w)
        path = cache_path(spec, w.cache_dir)
        cached = path.exists()
        start = time.perf_counter()
        data = load_or_generate(spec, w.cache_dir, progress=progress)
        sim = shared_simulator(spec.lo_geometry, min_reynolds=spec.min_reynolds, cg_tolerance=w.cg_tolerance)
        weight = loss_weight(sim.mask, data.stats)
        info = {"source": "wake-flow data", "path": str(path), "cached": cached,
                "seconds": time.perf_counter() - start}
        return {"simulator": sim, "data": data, "data_info": info, "train": (data.train, data.train_re),
                "test": (data.test, data.test_re), "mask": sim.mask, "weight": weight,
                "step_cap": step_cap(data.train, weight, w.divergence_factor),
                "new_corrector": lambda seed: build_corrector(w, data, seed), "differentiable": True}

    def test_run_index(self, runs: int) -> int:
        return runs // 2  # the middle Reynolds number

    def plot_test_run(self, rows: dict[str, Tensor], run_label: str, path, title: str) -> None:
        """A vorticity strip (reference, source, corrected) at five times of the rollout."""
        t_max = next(iter(rows.values())).shape[0] - 1
        times = sorted({0, t_max // 4, t_max // 2, 3 * t_max // 4, t_max})
        nx = next(iter(rows.values())).shape[2] - 1  # [steps+1, 2, nx+1, ny+1]
        dx = WakeFlowGeometry(nx=nx, ny=2 * nx).dx
        plot_vorticity_strip(rows, dx, times, path, title=f"test run {run_label.replace('Re ', 'Re = ')}")


assert set(CORRECTOR_SIZES) == {"paper", "medium", "small", "tiny"}  # keep WakeSettings.corrector in sync
