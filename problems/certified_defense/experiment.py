"""`blackbox-zo experiment certified-defense`: the Table 2-like study on digits, end to end.

DeepZero Sec. 6.2 / Appx. G / Table 2, scaled to scikit-learn's 8x8 digits:

1. base classifier f, first-order on clean digits -> ONNX; from then on only the ONNX Runtime
   session is used (images in, logits out, every image counted);
2. DnCNN denoiser D pretrained with MSE (Adam), first-order;
   (Appx. G analysis, optional: ZO-GraSP scores of *all* denoiser parameters through the
   black box at 95% sparsity, and how many coordinates each layer keeps -- the observation
   that made the paper fine-tune only the last layer);
3. fine-tune the last layer of D on eq. (A2): by ZO through the black box (ours), and by
   first-order through a white-box torch copy of f (the upper reference), same settings;
4. Cohen et al.'s CERTIFY on a class-balanced test subset for four smoothed classifiers
   (no denoiser, MSE-only, FO fine-tune, ZO fine-tune), all sharing the same noise draws
   per test point (common random numbers across rows: the rows differ only by their D).

Writes, under --out (default runs/certified-defense-experiment/<timestamp>/):
table.md / table.csv (certified accuracy at r in {0, 0.25, 0.5, 0.75} plus costs),
certified_accuracy.png, certify_<row>.csv (per-point class, radius, correctness),
grasp_layers.md/.csv, summary.json, and the two training runs zo/ and fo/.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from blackbox_zo.config import ConfigError, resolve_config
from blackbox_zo.rundir import CHECKPOINT_NAME, atomic_write_text
from blackbox_zo.sparsity import balanced_indices, global_keep_mask, layer_ratios, prunable_mask, zo_grasp_scores
from blackbox_zo.trainer import train
from oracles.certification import CertifyResult, certify_dataset, max_certifiable_radius, samples_needed
from oracles.classifier import BlackBoxClassifier, OnnxFunction, export_onnx
from oracles.smoothing import DefenseBatch, DenoisedSmoothingOracle, DnCNN
from problems.digits import load_digits_split

from . import (
    IMAGE_SHAPE,
    CertifiedDefenseConfig,
    CertifiedDefenseProblem,
    load_denoiser,
    load_stage_models,
    prepare_stages,
    stratified_subset,
)
from .plots import plot_certified_accuracy

TABLE_RADII = (0.0, 0.25, 0.5, 0.75)
ROWS = (
    ("none", "no denoiser"),
    ("mse", "MSE-only denoiser"),
    ("fo", "FO fine-tune (white-box reference)"),
    ("zo", "ZO fine-tune (ours)"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blackbox-zo experiment certified-defense",
        description="Black-box certified defense on digits (DeepZero Sec. 6.2, Table 2): train, fine-tune "
        "(ZO and the FO reference), certify (Cohen et al.), write table + plot.",
    )
    p.add_argument("--out", type=Path, help="output directory (default runs/certified-defense-experiment/<timestamp>)")
    p.add_argument("--n", type=int, default=10_000, help="CERTIFY estimation samples N (>= 5114 to reach r = 0.75)")
    p.add_argument("--n0", type=int, default=100, help="CERTIFY selection samples N0")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    p.add_argument("--test-size", type=int, default=200, help="class-balanced test subset (digits test split: 360)")
    p.add_argument("--sample-batch", type=int, default=10_000, help="noise samples per batch in CERTIFY")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads (1: on a shared machine a second thread mostly spins)")
    p.add_argument("--grasp-per-class", type=int, default=10,
                   help="images per class of the ZO-GraSP layer analysis; 0 skips it")
    p.add_argument("--grasp-sparsity", type=float, default=0.95, help="ZO-GraSP pruning ratio (Appx. G: 95%%)")
    p.add_argument("--grasp-q", type=int, default=192, help="RGE directions of the ZO-GraSP layer analysis")
    p.add_argument("--grasp-mu", type=float, default=5e-3, help="finite-difference step of the ZO-GraSP layer analysis")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training/stage settings for both fine-tunes, e.g. --set defense.denoiser_width=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("n", 1), ("n0", 1), ("test_size", 1), ("sample_batch", 1), ("threads", 1),
                      ("grasp_per_class", 0), ("grasp_q", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {args.alpha}")
    if not 0 <= args.grasp_sparsity < 1:
        raise ConfigError(f"--grasp-sparsity must be in [0, 1), got {args.grasp_sparsity}")
    if not args.grasp_mu > 0:
        raise ConfigError(f"--grasp-mu must be > 0, got {args.grasp_mu}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv or []))
    problem = CertifiedDefenseProblem()
    try:
        _check_args(args)
        overrides = list(args.set) + (["run.progress=false"] if args.no_progress else [])
        config: CertifiedDefenseConfig = problem.resolve_config(None, overrides)  # type: ignore[assignment]
    except ConfigError as exc:
        print(f"blackbox-zo: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = config.model_copy(update={"defense": config.defense.model_copy(update={"onnx_threads": args.threads})})
    out = args.out or Path("runs") / "certified-defense-experiment" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    summary = run(config, out, args)
    print(summary["table_markdown"])
    print(f"wrote {out}/table.md, table.csv, certified_accuracy.png, summary.json ({summary['wall_s']:.0f} s)")
    return 0


# ----------------------------------------------------------------------------- stages


def _train_stage(problem, config: CertifiedDefenseConfig, run_dir: Path) -> tuple[dict[str, Any], int]:
    """One fine-tune through the trainer; returns (summary, images the black box was sent)."""
    seen: dict[str, Any] = {}

    def capture(trainer, record) -> None:  # the setup's black box, to read its image counter
        seen.setdefault("black_box", trainer.setup.extras["black_box"])

    summary = train(problem, config, run_dir=run_dir, callbacks=[capture])
    black_box = seen.get("black_box")
    return summary, int(black_box.queries) if black_box is not None else 0


def grasp_layer_analysis(config: CertifiedDefenseConfig, denoiser: DnCNN, black_box: BlackBoxClassifier,
                         per_class: int, sparsity: float, q: int = 192, mu: float = 5e-3
                         ) -> tuple[list[dict[str, Any]], int]:
    """ZO-GraSP (DeepZero eq. 3) over every denoiser parameter, through the black box.

    Appx. G: after MSE pretraining, ZO-GraSP at 95% keeps almost nothing except in the first
    and last layers. Here: how many of each conv layer's weights a global 95% mask keeps,
    for GraSP's ranking (prune the largest scores) and for |score|.
    Returns (one row per conv layer, loss queries spent).
    """
    x_tr, _, _, _ = load_digits_split(config.data.seed)
    with torch.no_grad():
        labels = black_box(x_tr).argmax(1)
    idx = balanced_indices(labels, per_class, seed=config.run.seed)
    gen = torch.Generator().manual_seed(30_000 + config.run.seed)
    xb = x_tr[idx]
    batch = DefenseBatch(xb, labels[idx], config.defense.sigma * torch.randn(xb.shape, generator=gen))
    den = copy.deepcopy(denoiser).eval()
    names = [n for n, _ in den.named_parameters()]
    oracle = DenoisedSmoothingOracle(den, black_box, trainable=names, feature_reuse=False)
    theta = oracle.initial_theta()
    res = zo_grasp_scores(oracle, theta, batch, q=q, mu=mu, seed=config.run.seed)
    prunable = prunable_mask(oracle.space, weights_only=True)
    # Both rankings from the same scores (no extra queries): GraSP prunes the largest scores,
    # DeepZero's reference code ranks by |score|.
    ratios = {r: layer_ratios(oracle.space, global_keep_mask(res.scores, sparsity, prunable, r), prunable)
              for r in ("largest", "abs")}
    rows = []
    for b in oracle.space:
        if not ratios["largest"].prunable[b.name]:
            continue
        rows.append({"layer": b.name, "numel": b.numel,
                     **{f"kept_{r}": f"{ratios[r].keep[b.name]} ({ratios[r].keep[b.name] / b.numel:.1%})"
                        for r in ratios},
                     "uniform": f"{1 - sparsity:.1%}"})
    return rows, res.queries


# ------------------------------------------------------------------------ certification


class SmoothedBase:
    """base(z) = argmax f(D(z)): our denoiser (ONNX Runtime or torch), then the black box."""

    def __init__(self, black_box: BlackBoxClassifier, denoise: Callable[[Tensor], Tensor] | None):
        self.black_box, self.denoise = black_box, denoise

    def __call__(self, images: Tensor) -> Tensor:
        z = images if self.denoise is None else self.denoise(images)
        return self.black_box(z).argmax(1)


class FastDenoisers:
    """Our denoisers for certification: the frozen prefix on ONNX Runtime, the last layer in torch.

    ONNX Runtime runs the small convolutions of the prefix several times faster than eager
    torch on a CPU, and the three denoisers (MSE, FO, ZO) differ only in their last layer, so
    one exported prefix serves all of them (keyed by its weights: a denoiser with another
    prefix gets its own export). Each composition is checked against the plain torch
    forward (pixels are O(1); float32 reorderings give ~1e-6, so 1e-4 is a real mismatch);
    on a mismatch or a failed export the torch forward is used instead.
    """

    def __init__(self, directory: Path, threads: int, check: Tensor):
        self.directory, self.threads, self.check = Path(directory), int(threads), check
        self.prefixes: dict[str, Callable[[Tensor], Tensor]] = {}

    @staticmethod
    def _key(den: DnCNN) -> str:
        h = hashlib.sha256()
        for name, t in sorted(den.prefix.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def __call__(self, den: DnCNN) -> Callable[[Tensor], Tensor]:
        den = den.eval()

        def torch_denoise(z: Tensor) -> Tensor:
            with torch.no_grad():
                return den(z)

        key = self._key(den)
        try:
            if key not in self.prefixes:
                path = export_onnx(den.prefix, self.directory / f"denoiser_prefix_{key}.onnx", tuple(self.check.shape[1:]),
                                   names=("noisy", "features"))
                self.prefixes[key] = OnnxFunction(path, threads=self.threads)
            prefix = self.prefixes[key]

            def fast_denoise(z: Tensor) -> Tensor:
                with torch.no_grad():
                    return den.head(z, prefix(z))

            with torch.no_grad():
                gap = float((fast_denoise(self.check) - den(self.check)).abs().max())
            if gap <= 1e-4:
                return fast_denoise
            print(f"[certify] ONNX denoiser prefix differs from torch by {gap:.2e}; using torch")
        except Exception as exc:  # ONNX is an accelerator here, never a requirement
            print(f"[certify] ONNX export of the denoiser failed ({type(exc).__name__}: {exc}); using torch")
        return torch_denoise


def certify_row(black_box, denoise, x: Tensor, y: Tensor, sigma: float, args, progress: bool, desc: str
                ) -> CertifyResult:
    black_box.reset_queries()
    base = SmoothedBase(black_box, denoise)
    return certify_dataset(base, x, y, sigma, args.n0, args.n, args.alpha, num_classes=10,
                           batch_size=args.sample_batch, seed=0, query_counter=lambda: black_box.queries,
                           progress=progress, desc=desc)


# ------------------------------------------------------------------------------- report


def write_point_csv(path: Path, result: CertifyResult, indices: Tensor) -> None:
    lines = ["test_index,label,predict,radius,correct"]
    for i, label, pred, rad in zip(indices.tolist(), result.labels, result.predictions, result.radii):
        lines.append(f"{i},{label},{pred},{rad:.6f},{int(pred == label)}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def format_table(rows: list[dict[str, Any]], radii: Sequence[float]) -> str:
    head = ["method"] + [f"r = {r:g}" for r in radii] + ["ZO/FO fine-tune cost", "certify s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"]] + [f"{100 * row[f'ca@{r:g}']:.1f}" for r in radii] + [row["cost"], f"{row['certify_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- run


def run(config: CertifiedDefenseConfig, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    progress = config.run.progress
    d = config.defense
    problem = CertifiedDefenseProblem()
    timings: dict[str, float] = {}
    atomic_write_text(out / "config.json", config.model_dump_json(indent=2) + "\n")

    # Stages 1-2 (first-order, cached).
    t = time.perf_counter()
    stages = prepare_stages(config)
    black_box, _white_box, den_mse = load_stage_models(stages, d)
    timings["stages_1_2_s"] = time.perf_counter() - t

    grasp_rows: list[dict[str, Any]] = []
    if args.grasp_per_class > 0:
        t = time.perf_counter()
        grasp_rows, grasp_queries = grasp_layer_analysis(config, den_mse, black_box, args.grasp_per_class,
                                                         args.grasp_sparsity, args.grasp_q, args.grasp_mu)
        timings["grasp_analysis_s"] = time.perf_counter() - t
        print(f"[grasp] {grasp_queries} loss queries of {10 * args.grasp_per_class} images each, "
              f"{timings['grasp_analysis_s']:.0f} s")
        _write_csv(out / "grasp_layers.csv", grasp_rows)
        atomic_write_text(out / "grasp_layers.md", _markdown(grasp_rows) + "\n")
        print("[grasp] ZO-GraSP layer analysis (fraction of each layer's weights kept at "
              f"{args.grasp_sparsity:.0%} sparsity):\n" + _markdown(grasp_rows))

    # Stage 3: ZO fine-tune (ours) and the FO reference with the same settings.
    t = time.perf_counter()
    zo_summary, zo_images = _train_stage(problem, config, out / "zo")
    timings["zo_finetune_s"] = time.perf_counter() - t
    # the same settings with the first-order reference (which takes no mu, scheme or sparsity)
    fo_config = resolve_config(CertifiedDefenseConfig, config.model_dump(), None, ["estimator=autograd"],
                               name=problem.name)
    t = time.perf_counter()
    fo_summary, _ = _train_stage(problem, fo_config, out / "fo")
    timings["fo_finetune_s"] = time.perf_counter() - t

    def finetuned(run_dir: Path) -> DnCNN:
        state = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["module"]
        return load_denoiser(d, state)

    denoisers = {"none": None, "mse": den_mse, "fo": finetuned(out / "fo"), "zo": finetuned(out / "zo")}

    # Stage 4: certification on a class-balanced test subset.
    _, _, x_te, y_te = load_digits_split(config.data.seed)
    idx = stratified_subset(y_te, args.test_size, seed=0)
    x, y = x_te[idx], y_te[idx]
    check = x[:16] + d.sigma * torch.randn(x[:16].shape, generator=torch.Generator().manual_seed(1))
    results: dict[str, CertifyResult] = {}
    fast = FastDenoisers(out / "denoisers", args.threads, check)
    for key, label in ROWS:
        den = denoisers[key]
        denoise = None if den is None else fast(den)
        results[key] = certify_row(black_box, denoise, x, y, d.sigma, args, progress, desc=f"certify {key}")
        write_point_csv(out / f"certify_{key}.csv", results[key], idx)
        ca = results[key].accuracy_at(TABLE_RADII)
        print(f"[certify] {label}: " + ", ".join(f"r={r:g}: {a:.3f}" for r, a in zip(TABLE_RADII, ca))
              + f" ({results[key].seconds:.0f} s)", flush=True)
    timings["certify_s"] = sum(r.seconds for r in results.values())

    r_max = max_certifiable_radius(d.sigma, args.n, args.alpha)
    batch_size = config.data.batch_size
    zo_q = zo_summary["queries"]
    costs = {
        "none": "-",
        "mse": "-",
        "fo": f"{fo_summary['steps']} steps, white-box gradients",
        "zo": f"{zo_summary['steps']} steps, {zo_q['train']:,} loss queries x {batch_size} images",
    }
    table_rows = []
    for key, label in ROWS:
        row = {"key": key, "method": label, **{f"ca@{r:g}": a for r, a in zip(TABLE_RADII, results[key].accuracy_at(TABLE_RADII))},
               "abstain": float((results[key].predictions == -1).mean()),
               "mean_radius_correct": float(np.where(results[key].correct, results[key].radii, 0.0).mean()),
               "cost": costs[key], "certify_s": results[key].seconds, "black_box_images": results[key].base_queries}
        table_rows.append(row)
    table_md = format_table(table_rows, TABLE_RADII)
    caption = (f"Certified accuracy (%) on {len(idx)} class-balanced digits test images; sigma = {d.sigma}, "
               f"N0 = {args.n0}, N = {args.n:,}, alpha = {args.alpha} (largest certifiable radius {r_max:.3f}; "
               f"r = 0.75 needs N >= {samples_needed(0.75, d.sigma, args.alpha):,}). Denoiser: DnCNN depth "
               f"{d.denoiser_depth}, width {d.denoiser_width} ({stages.info['denoiser_params']:,} parameters), "
               f"last layer fine-tuned ({d.denoiser_width * 9 + 1} parameters). Black box: ONNX Runtime session "
               f"of a {stages.info['classifier_params']:,}-parameter CNN (clean test acc "
               f"{stages.info['classifier_clean_acc_onnx']:.3f}).")
    atomic_write_text(out / "table.md", caption + "\n\n" + table_md + "\n")
    _write_csv(out / "table.csv", [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                                   for r in table_rows])
    labels = dict(ROWS)
    plot_certified_accuracy(out / "certified_accuracy.png", {k: (labels[k], [v]) for k, v in results.items()}, r_max,
                            f"digits, sigma={d.sigma}, N={args.n:,}, {len(idx)} test images", marks=TABLE_RADII)

    zo, fo, mse, none = (results[k].accuracy_at(TABLE_RADII) for k in ("zo", "fo", "mse", "none"))
    acceptance = {
        "zo_beats_mse_at_0.25": zo[1] > mse[1],
        "zo_beats_mse_at_0.5": zo[2] > mse[2],
        "zo_beats_none_everywhere": all(a > b for a, b in zip(zo, none)),
        "zo_minus_fo_points": {f"{r:g}": round(100 * (a - b), 2) for r, a, b in zip(TABLE_RADII, zo, fo)},
        "zo_minus_mse_points": {f"{r:g}": round(100 * (a - b), 2) for r, a, b in zip(TABLE_RADII, zo, mse)},
    }
    summary = {
        "table": table_rows,
        "table_markdown": caption + "\n\n" + table_md,
        "acceptance": acceptance,
        "settings": {"n": args.n, "n0": args.n0, "alpha": args.alpha, "test_size": len(idx), "sigma": d.sigma,
                     "threads": args.threads, "largest_certifiable_radius": r_max,
                     "denoiser": {"depth": d.denoiser_depth, "width": d.denoiser_width,
                                  "params": stages.info["denoiser_params"], "trainable": d.denoiser_width * 9 + 1}},
        "stages": stages.info,
        "zo_finetune": {**zo_summary, "black_box_images_incl_eval": zo_images},
        "fo_finetune": fo_summary,
        "grasp_layers": grasp_rows,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
