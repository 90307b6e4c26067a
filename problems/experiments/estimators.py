"""The estimator study (`blackbox-zo experiment estimators`): DeepZero Fig. 2 and Table A1 at digits scale,
and the cosine similarity of every estimator to the autograd gradient at equal query budgets.

1. Fig. 2 analogue. The simple CNN of DeepZero Appx. B (Fig. A1): conv-BN-ReLU-maxpool blocks,
   global average pooling, a linear layer; two blocks for 8x8 digits, at several widths. Each
   width is trained by first-order SGD (backprop, the reference), by ZO CGE (d + 1 queries per
   step) and by ZO RGE with q = d Gaussian directions (d + 1 queries: equal queries, as the
   paper), all with SGD momentum 0.9 and a cosine schedule through the project's trainer.
   Learning rates are per method (`--lrs`), chosen by `--tune` (a grid on a validation split
   carved from the training set, never the test set); the DeepZero reference values CGE 1e-3 /
   RGE 1e-4 are the `--lrs reference` preset.
2. Table A1 analogue. One gradient estimate with q = d, timed in DeepZero's four stages:
   (1) direction generation, (2) weight perturbation, (3) model inference, (4) arithmetic,
   CGE vs RGE, at several d. Both run the same plain vmapped forward (feature reuse off, so the
   stages mean the same thing for both); the extra column `cge_fast_path_s` is CGE through the
   oracle's own `coordinate_losses` (exact feature reuse, when the oracle has it).
   The instrumented estimates equal the library's CGE/RGE estimates (tested).
3. Cosine similarity to the autograd gradient at equal budgets of Q loss queries (Q - 1 = d/8,
   d/4, d/2, d), mean over seeds: CGE forward/central on a random coordinate subset, RGE
   Gaussian/sphere forward/central, linear interpolation (LASSO for m < d, exact orthonormal
   solve at m = d), and HZO at its own cost (shown in full-forward equivalents).

Defaults (about 10 minutes of CPU on 2 cores): widths 2,4,8 (d = 96, 254, 786), 6 epochs,
batch 32, lrs FO 0.2 / CGE 0.2 / RGE 0.05 (from `--tune`); timing at widths 2,4,8,16 (d up to
2714), 2 repetitions, batch 32; cosines at width 8, 3 seeds.
Outputs under --out (default runs/experiments/estimators/<timestamp>/): fig2.{csv,md,png},
timing.{csv,md,png}, cosine.{csv,md,png}, tuning.{csv,md} (with --tune), summary.md.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from blackbox_zo.config import TrainConfig
from blackbox_zo.estimators import CGE, RGE, LinearInterpolation
from blackbox_zo.plan import QueryPlan, execute
from blackbox_zo.contrib.hzo import HZO, TorchStages
from blackbox_zo.problem import Problem, TensorBatches, TrainingSetup
from blackbox_zo.trainer import train
from oracles.model_loss import ModelLossOracle
from problems.digits import load_digits_split

from .args import int_list, positive
from .tables import experiment_dir, write_table

__all__ = ["make_simple_cnn", "digits_data", "plain_oracle", "autograd_gradient", "cosine_similarity", "timed_cge",
           "timed_rge", "fig2", "timing_table", "cosine_table", "main"]

METHODS = ("fo", "cge", "rge")
LABELS = {"fo": "FO SGD (backprop)", "cge": "ZO CGE", "rge": "ZO RGE (q = d)"}
DEFAULT_LRS = {"fo": 0.2, "cge": 0.2, "rge": 0.05}  # chosen by `--tune` at width 4, 6 epochs, batch 32 (docs/estimators.md)
REFERENCE_LRS = {"fo": 0.1, "cge": 1e-3, "rge": 1e-4}  # DeepZero's reference discussion for CGE / RGE


# ------------------------------------------------------------------------------ model


def make_simple_cnn(width: int, blocks: int = 2, classes: int = 10) -> nn.Sequential:
    """DeepZero Appx. B: `blocks` x [conv 3x3, BN, ReLU, maxpool 2], global average pool, linear."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def n_params(width: int) -> int:
    return sum(p.numel() for p in make_simple_cnn(width).parameters())


def digits_data(validation: bool, seed: int = 0):
    """Train/test tensors; with `validation`, the test set is a held-out 20% of the training set."""
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    if not validation:
        return x_tr, y_tr, x_te, y_te
    perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(1000 + seed))
    cut = int(0.8 * len(y_tr))
    return x_tr[perm[:cut]], y_tr[perm[:cut]], x_tr[perm[cut:]], y_tr[perm[cut:]]


class SimpleCNNDigits(Problem):
    """Digits with DeepZero's simple CNN, for the trainer (not registered: used by this study only)."""

    name = "digits-simple-cnn"

    def __init__(self, width: int, validation: bool = False):
        self.width, self.validation = width, validation

    def default_config(self) -> dict[str, Any]:
        return {}

    def setup(self, config: TrainConfig) -> TrainingSetup:
        x_tr, y_tr, x_te, y_te = digits_data(self.validation)
        torch.manual_seed(config.run.seed)
        module = make_simple_cnn(self.width)

        def evaluate(m: nn.Module) -> dict[str, float]:
            with torch.no_grad():
                return {"test_acc": float((m(x_te).argmax(1) == y_te).float().mean())}

        def fo_loss(m: nn.Module, batch) -> Tensor:
            return F.cross_entropy(m(batch[0]), batch[1])

        return TrainingSetup(oracle=ModelLossOracle(module), module=module, evaluate=evaluate, fo_loss=fo_loss,
                             train_batches=TensorBatches(x_tr, y_tr, batch_size=config.data.batch_size, seed=config.run.seed))


def train_one(width: int, method: str, lr: float, epochs: int, batch_size: int, seed: int, mu: float,
              validation: bool = False, progress: bool = True) -> dict[str, Any]:
    d = n_params(width)
    estimator = {"fo": {"kind": "autograd"}, "cge": {"kind": "cge", "mu": mu},
                 "rge": {"kind": "rge", "mu": mu, "q": d, "distribution": "gaussian"}}[method]
    config = TrainConfig.model_validate({
        "problem": "digits-simple-cnn", "estimator": estimator,
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
        "schedule": {"name": "cosine"}, "data": {"batch_size": batch_size},
        "run": {"epochs": epochs, "seed": seed, "progress": progress},
    })
    start = time.perf_counter()
    summary = train(SimpleCNNDigits(width, validation), config)
    return {"width": width, "d": d, "method": method, "lr": lr, "seed": seed, "epochs": epochs,
            "test_acc": summary["test_acc"], "queries": summary["queries"]["total"],
            "wall_s": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------- 1. Fig. 2 analogue


def fig2(widths, lrs, epochs, batch_size, seeds, mu, progress) -> list[dict[str, Any]]:
    rows = []
    for width in widths:
        for method in METHODS:
            for seed in seeds:
                rows.append(train_one(width, method, lrs[method], epochs, batch_size, seed, mu, progress=progress))
    return rows


def fig2_summary(rows) -> list[dict[str, Any]]:
    out = []
    for width in dict.fromkeys(r["width"] for r in rows):
        row: dict[str, Any] = {"width": width, "d (= queries per ZO step - 1)": next(r["d"] for r in rows if r["width"] == width)}
        for method in METHODS:
            accs = [r["test_acc"] for r in rows if r["width"] == width and r["method"] == method]
            if accs:
                row[f"{method}_acc"] = round(statistics.fmean(accs), 4)
                if len(accs) > 1:
                    row[f"{method}_std"] = round(statistics.stdev(accs), 4)
                row[f"{method}_lr"] = next(r["lr"] for r in rows if r["width"] == width and r["method"] == method)
        out.append(row)
    return out


def plot_fig2(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, method in enumerate(METHODS):
        pts = sorted({r["d"] for r in rows if r["method"] == method})
        if not pts:
            continue
        means = [statistics.fmean(r["test_acc"] for r in rows if r["method"] == method and r["d"] == d) for d in pts]
        ax.plot(pts, [100 * m for m in means], marker="o", color=f"C{i}",
                label=f"{LABELS[method]} (lr {next(r['lr'] for r in rows if r['method'] == method):g})")
        for r in rows:
            if r["method"] == method:
                ax.scatter([r["d"]], [100 * r["test_acc"]], color=f"C{i}", s=8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("number of parameters d (CGE / RGE queries per step: d + 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("DeepZero Fig. 2 at digits scale: simple CNN")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(width, epochs, batch_size, mu, grid: dict[str, list[float]], progress) -> tuple[dict[str, float], list]:
    """Per-method lr from a grid, scored on a validation split of the training set."""
    rows = []
    best = {}
    for method, lrs in grid.items():
        for lr in lrs:
            r = train_one(width, method, lr, epochs, batch_size, 0, mu, validation=True, progress=progress)
            rows.append({"method": method, "lr": lr, "width": width, "epochs": epochs, "val_acc": r["test_acc"]})
        best[method] = max((r for r in rows if r["method"] == method), key=lambda r: r["val_acc"])["lr"]
    return best, rows


# ------------------------------------------------------------------ 2. Table A1 analogue


def plain_oracle(module: nn.Module) -> ModelLossOracle:
    """The oracle on its plain vmapped forward (feature reuse off, where the oracle has it)."""
    if "feature_reuse" in inspect.signature(ModelLossOracle.__init__).parameters:
        return ModelLossOracle(module, feature_reuse=False)
    return ModelLossOracle(module)


_STAGES = ("direction_generation", "weight_perturbation", "model_inference", "arithmetic")


def _timed_estimate(estimator, oracle, theta: Tensor, batch, seed: int | None) -> tuple[Tensor, dict[str, float]]:
    """One estimate split into DeepZero's four stages: the executor times the first three on its
    reference path (perturbed vectors built here, then batched `query`, also for coordinates), and
    combining the losses is the arithmetic. Same plan, same losses, same estimate as `estimate`."""
    t = dict.fromkeys(_STAGES, 0.0)
    start = time.perf_counter()
    plan = estimator.plan(theta, seed=seed, chunk=max(1, oracle.chunk_size(theta)))
    t["direction_generation"] += time.perf_counter() - start  # CGE: e_i is an index ('free')
    losses = execute(plan, oracle, batch, profile=t, fast_path=False)
    start = time.perf_counter()
    grad = estimator.combine(plan, losses).grad
    t["arithmetic"] += time.perf_counter() - start
    return grad, t


def timed_cge(oracle, theta: Tensor, batch, mu: float) -> tuple[Tensor, dict[str, float]]:
    """Forward CGE (DeepZero eq. (1)) split into the four stages; equals `CGE(mu).estimate` on the plain oracle."""
    return _timed_estimate(CGE(mu=mu), oracle, theta, batch, seed=None)


def timed_rge(oracle, theta: Tensor, batch, q: int, mu: float, seed: int) -> tuple[Tensor, dict[str, float]]:
    """Forward Gaussian RGE with q directions split into the four stages; equals `RGE(q, mu).estimate(seed=seed)`."""
    return _timed_estimate(RGE(q=q, mu=mu), oracle, theta, batch, seed=seed)


def timing_table(widths, reps, batch_size, mu, progress) -> list[dict[str, Any]]:
    x_tr, y_tr, _, _ = digits_data(False)
    batch = (x_tr[:batch_size], y_tr[:batch_size])
    rows = []
    for width in tqdm(list(widths), desc="timing", disable=not progress, dynamic_ncols=True):
        torch.manual_seed(0)
        module = make_simple_cnn(width)
        oracle = plain_oracle(module)
        theta = oracle.initial_theta()
        d = theta.numel()
        execute(QueryPlan.at(theta.repeat(2, 1)), oracle, batch)  # warm-up (first vmap call)
        sums = {"cge": None, "rge": None}
        for rep in range(reps):
            for name, fn in (("cge", lambda: timed_cge(oracle, theta, batch, mu)),
                             ("rge", lambda: timed_rge(oracle, theta, batch, d, mu, seed=rep))):
                _, t = fn()
                sums[name] = t if sums[name] is None else {k: sums[name][k] + t[k] for k in t}
        fast = ModelLossOracle(module)
        CGE(mu=mu).estimate(fast, theta, batch)  # warm-up: the fast path traces and caches on its first call
        start = time.perf_counter()
        for _ in range(reps):
            CGE(mu=mu).estimate(fast, theta, batch)
        fast_s = (time.perf_counter() - start) / reps
        row: dict[str, Any] = {"width": width, "d": d}
        for stage, short in (("direction_generation", "DV"), ("weight_perturbation", "WP"),
                             ("model_inference", "MI"), ("arithmetic", "AO")):
            row[f"{short} RGE/CGE [s]"] = f"{sums['rge'][stage] / reps:.4f} / {sums['cge'][stage] / reps:.4f}"
            row[f"rge_{short}"] = sums["rge"][stage] / reps
            row[f"cge_{short}"] = sums["cge"][stage] / reps
        row["rge_total_s"] = sum(sums["rge"].values()) / reps
        row["cge_total_s"] = sum(sums["cge"].values()) / reps
        row["cge_fast_path_s"] = fast_s
        row["fast_path"] = "feature reuse" if getattr(fast, "reuse", None) is not None else "plain vmap"
        rows.append(row)
    return rows


def plot_timing(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("DV", "WP", "MI", "AO")
    names = {"DV": "(1) directions", "WP": "(2) perturbation", "MI": "(3) inference", "AO": "(4) arithmetic"}
    fig, axes = plt.subplots(1, len(stages), figsize=(12, 3.2), sharex=True)
    ds = [r["d"] for r in rows]
    for ax, s in zip(axes, stages):
        floor = 1e-6  # CGE's direction generation is an index (~1e-6 s): drawn at the floor of a log axis
        ax.plot(ds, [max(floor, r[f"rge_{s}"]) for r in rows], marker="o", label="RGE (q = d)")
        ax.plot(ds, [max(floor, r[f"cge_{s}"]) for r in rows], marker="s", label="CGE")
        if s == "MI":
            ax.plot(ds, [r["cge_fast_path_s"] for r in rows], marker="^", ls="--",
                    label=f"CGE total, oracle path ({rows[0]['fast_path']})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(names[s], fontsize=9)
        ax.set_xlabel("d")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("seconds per estimate")
    axes[2].legend(fontsize=7)
    fig.suptitle("DeepZero Table A1 at digits scale: time per gradient estimate by stage", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- 3. cosine table


def autograd_gradient(module: nn.Module, theta: Tensor, space, batch) -> Tensor:
    """Reference gradient of the same function the oracle computes (BN with batch statistics, no buffer update)."""
    x, y = batch
    params = {k: v.clone().requires_grad_(True) for k, v in space.views(theta).items()}
    buffers = {n: None for n, _ in module.named_buffers()}  # norm layers in training mode: batch statistics only
    with torch.enable_grad():
        loss = F.cross_entropy(functional_call(module, {**params, **buffers}, (x,), strict=False), y)
        grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def cosine_similarity(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def cosine_table(width, fractions, seeds, batch_size, mu, progress) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    x_tr, y_tr, _, _ = digits_data(False)
    batch = (x_tr[:batch_size], y_tr[:batch_size])
    torch.manual_seed(0)
    module = make_simple_cnn(width)
    oracle = ModelLossOracle(module)
    theta = oracle.initial_theta()
    d = theta.numel()
    g = autograd_gradient(module, theta, oracle.space, batch)
    raw = []
    jobs = [(f, s) for f in fractions for s in seeds]
    for frac, seed in tqdm(jobs, desc="cosines", disable=not progress, dynamic_ncols=True):
        k = max(1, int(round(frac * d)))  # Q = k + 1 loss queries (forward schemes), 2 (k//2) central
        half = max(1, k // 2)
        coords = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
        interp = (LinearInterpolation(m=None, mu=mu, directions="orthonormal") if k >= d else
                  LinearInterpolation(m=k, mu=mu, directions="dct", warm_start=False, max_iters=300))
        estimators = {
            "CGE forward (random coords)": lambda: CGE(mu=mu).estimate(oracle, theta, batch, coords=coords[:k]),
            "CGE central (random coords)": lambda: CGE(mu=mu, scheme="central").estimate(oracle, theta, batch, coords=coords[:half]),
            "RGE gaussian forward": lambda: RGE(q=k, mu=mu).estimate(oracle, theta, batch, seed=seed),
            "RGE sphere forward": lambda: RGE(q=k, mu=mu, distribution="sphere").estimate(oracle, theta, batch, seed=seed),
            "RGE gaussian central": lambda: RGE(q=half, mu=mu, scheme="central").estimate(oracle, theta, batch, seed=seed),
            "linear interpolation (LASSO; m=d: exact)": lambda: interp.estimate(oracle, theta, batch, seed=seed),
        }
        for name, fn in estimators.items():
            e = fn()
            raw.append({"estimator": name, "fraction": frac, "budget_Q": e.queries, "seed": seed,
                        "cos": cosine_similarity(e.grad, g)})
    # HZO on the same network with BN in eval mode (HZO needs sample-independent stages), at its own cost.
    module.eval()
    staged = TorchStages(module)
    g_eval = _autograd_eval(module, staged.theta(), staged.space, batch)
    e = HZO(mu=mu).estimate(staged, staged.theta(), batch)
    hzo_row = {"estimator": "HZO (BN in eval mode)", "fraction": e.queries / (staged.num_stages + 1) / d,
               "budget_Q": round(e.queries / (staged.num_stages + 1)), "seed": 0, "cos": cosine_similarity(e.grad, g_eval)}
    raw.append(hzo_row)
    table = []
    for name in dict.fromkeys(r["estimator"] for r in raw):
        row: dict[str, Any] = {"estimator": name}
        for frac in fractions if name != hzo_row["estimator"] else []:
            vals = [r["cos"] for r in raw if r["estimator"] == name and r["fraction"] == frac]
            row[f"Q-1 = {frac:g} d"] = f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}"
        if name == hzo_row["estimator"]:
            row["HZO's own cost"] = f"{hzo_row['cos']:.4f} at {hzo_row['budget_Q']} full-pass equivalents"
        table.append(row)
    return raw, table


def _autograd_eval(module, theta, space, batch) -> Tensor:
    x, y = batch
    params = {k: v.clone().requires_grad_(True) for k, v in space.views(theta).items()}
    with torch.enable_grad():
        loss = F.cross_entropy(functional_call(module, params, (x,), strict=False), y)
        grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def plot_cosine(raw, d: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [n for n in dict.fromkeys(r["estimator"] for r in raw) if not n.startswith("HZO")]
    for i, name in enumerate(names):
        fr = sorted({r["fraction"] for r in raw if r["estimator"] == name})
        ys = [statistics.fmean(r["cos"] for r in raw if r["estimator"] == name and r["fraction"] == f) for f in fr]
        ax.plot(fr, ys, marker="o", color=f"C{i}", label=name)
    for r in raw:
        if r["estimator"].startswith("HZO"):
            ax.scatter([r["fraction"]], [r["cos"]], marker="*", s=120, color="k", label=f"{r['estimator']}", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("query budget (Q - 1) / d")
    ax.set_ylabel("cosine similarity to autograd")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"equal query budgets, simple CNN (d = {d})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- main


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return values


def _lrs(text: str) -> dict[str, float]:
    if text == "reference":
        return dict(REFERENCE_LRS)
    out = dict(DEFAULT_LRS)
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        if key not in METHODS:
            raise argparse.ArgumentTypeError(f"--lrs: unknown method {key!r}; allowed: {', '.join(METHODS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lrs: {key} needs a number, got {value!r}") from None
        if not out[key] > 0:
            raise argparse.ArgumentTypeError(f"--lrs: {key} must be > 0, got {value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blackbox-zo experiment estimators", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int_list, default=[2, 4, 8], help="simple-CNN widths for Fig. 2 (default 2,4,8)")
    p.add_argument("--epochs", type=positive(int), default=6, help="training epochs per run (the paper: 50)")
    p.add_argument("--batch-size", type=positive(int), default=32)
    p.add_argument("--seeds", type=int_list, default=[1], help="training seeds (default 1)")
    p.add_argument("--lrs", type=_lrs, default=dict(DEFAULT_LRS),
                   help="per-method learning rates, e.g. fo=0.2,cge=0.2,rge=0.05 (default), or 'reference' (CGE 1e-3, RGE 1e-4)")
    p.add_argument("--tune", action="store_true", help="choose each method's lr on a validation split first")
    p.add_argument("--tune-grid", default="1.0,0.5,0.2,0.05", help="lrs tried by --tune")
    p.add_argument("--tune-width", type=positive(int), default=4)
    p.add_argument("--mu", type=positive(float), default=5e-3, help="finite-difference step (DeepZero: 5e-3)")
    p.add_argument("--timing-widths", type=int_list, default=[2, 4, 8, 16], help="widths for Table A1 (d up to 2714)")
    p.add_argument("--timing-reps", type=positive(int), default=2)
    p.add_argument("--cosine-width", type=positive(int), default=8)
    p.add_argument("--cosine-fractions", type=_fractions, default=[0.125, 0.25, 0.5, 1.0])
    p.add_argument("--cosine-seeds", type=int_list, default=[1, 2, 3])
    p.add_argument("--skip", default="", help="comma-separated parts to skip: fig2, timing, cosine")
    p.add_argument("--threads", type=positive(int), default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/estimators/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - {"fig2", "timing", "cosine"}:
        parser.error(f"--skip: unknown part(s) {sorted(skip - {'fig2', 'timing', 'cosine'})}; allowed: fig2, timing, cosine")
    try:
        grid = [float(v) for v in args.tune_grid.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--tune-grid: expected comma-separated numbers, got {args.tune_grid!r}")
    torch.set_num_threads(args.threads)
    out = experiment_dir(args.out, "estimators")
    progress = not args.no_progress
    summary = [f"# Estimator study\n\ncommand: `blackbox-zo experiment estimators {' '.join(argv or [])}`\n"]
    lrs = args.lrs
    if args.tune:  # also with --skip fig2: tuning alone
        lrs, rows = tune(args.tune_width, args.epochs, args.batch_size, args.mu, {m: grid for m in METHODS}, progress)
        summary.append(f"## lr tuning (validation split, width {args.tune_width})\n\n" + write_table(rows, out / "tuning")
                       + f"\nchosen: {lrs}\n")
    if "fig2" not in skip:
        rows = fig2(args.widths, lrs, args.epochs, args.batch_size, args.seeds, args.mu, progress)
        write_table(rows, out / "fig2_runs")
        summary.append("## Fig. 2 analogue: test accuracy vs parameters\n\n" + write_table(fig2_summary(rows), out / "fig2"))
        plot_fig2(rows, out / "fig2.png")
    if "timing" not in skip:
        rows = timing_table(args.timing_widths, args.timing_reps, args.batch_size, args.mu, progress)
        cols = ["d", "DV RGE/CGE [s]", "WP RGE/CGE [s]", "MI RGE/CGE [s]", "AO RGE/CGE [s]", "rge_total_s", "cge_total_s",
                "cge_fast_path_s", "fast_path"]
        summary.append("## Table A1 analogue: seconds per estimate (q = d)\n\n" + write_table(rows, out / "timing", cols))
        plot_timing(rows, out / "timing.png")
    if "cosine" not in skip:
        raw, table = cosine_table(args.cosine_width, args.cosine_fractions, args.cosine_seeds, args.batch_size, args.mu, progress)
        write_table(raw, out / "cosine_runs")
        cols = ["estimator"] + [f"Q-1 = {f:g} d" for f in args.cosine_fractions] + ["HZO's own cost"]
        summary.append(f"## Cosine similarity to autograd at equal query budgets (width {args.cosine_width}, "
                       f"d = {n_params(args.cosine_width)})\n\n" + write_table(table, out / "cosine", cols))
        plot_cosine(raw, n_params(args.cosine_width), out / "cosine.png")
    (out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
