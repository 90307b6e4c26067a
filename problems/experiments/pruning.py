"""Pruning quality on digits: DeepZero Table A2 at digits scale (`blackbox-zo experiment pruning`).

For each seed the digits CNN is initialised, pruning scores are computed at that
initialization on a balanced batch (25 examples per class), and for each sparsity a
global mask over the conv/linear weights is taken from

* random       uniformly random scores (per-layer ratios ~ uniform),
* magnitude    |theta| at init (the smallest are pruned),
* ZO-GraSP     DeepZero eq. (3), queries only (`blackbox_zo.sparsity.zo_grasp_scores`),
* FO-GraSP     eq. (2) by double backward (`fo_grasp_reference`, a first-order reference),

with both GraSP rankings ("largest": prune the largest S, as GraSP; "abs": keep the
largest |S|, as the DeepZero reference code). The *masked* (weight-sparse) model is then
trained first-order with one fixed recipe and its test accuracy recorded, as Table A2
does. The masks' agreement is reported per layer: Jaccard overlap of the ZO- and FO-GraSP
keep masks and the Spearman rank correlation (scipy.stats.spearmanr) of their scores.

Outputs (under --out, default runs/experiments/pruning/<timestamp>/): runs.csv (one row
per training run), pruning_table.{md,csv} (mean +- std over seeds), agreement.{md,csv},
layer_ratios.csv, pruning.png, summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blackbox_zo.config import CosineSchedule, SGDConfig
from blackbox_zo.optim import build_optimizer, build_scheduler
from blackbox_zo.oracle import ParamSpace
from blackbox_zo.problem import TensorBatches
from blackbox_zo.rundir import make_run_dir
from blackbox_zo.sparsity import (
    balanced_indices,
    global_keep_mask,
    grasp_query_cost,
    layer_ratios,
    magnitude_scores,
    prunable_mask,
    pruning_order_key,
    random_scores,
    zo_grasp_scores,
)
from oracles.model_loss import ModelLossOracle
from problems.digits import load_digits_split, make_digits_cnn

from .fo_grasp_reference import fo_grasp_scores

__all__ = ["PruningSettings", "masked_fo_train", "mask_agreement", "run_experiment", "main"]

CHANCE_LEVEL = 0.2  # a run below this test accuracy learnt nothing (chance is 0.1)
METHODS = ("random", "magnitude", "zo-grasp", "fo-grasp")
GRASP = ("zo-grasp", "fo-grasp")
LABELS = {"random": "Random", "magnitude": "Magnitude", "zo-grasp": "ZO-GraSP", "fo-grasp": "FO-GraSP"}


@dataclass
class PruningSettings:
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.95])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rankings: list[str] = field(default_factory=lambda: ["largest", "abs"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 30  # weight-sparse models train slower: 15 epochs left 90%-sparse masks underfit
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    warmup_epochs: float = 1.0  # without it lr 0.1 killed a masked run (loss stuck at ln 10); docs/sparsity.md
    width: int = 8
    q: int = 192
    mu: float = 5e-3
    samples_per_class: int = 25
    agreement_qs: list[int] = field(default_factory=list)  # extra q values for the agreement table only
    threads: int = 1


def _row_label(method: str, ranking: str | None) -> str:
    if method in GRASP:
        return f"{LABELS[method]} ({'largest S' if ranking == 'largest' else '|S|'})"
    return LABELS[method]


# ------------------------------------------------------------------- sparse training


def masked_fo_train(
    module: nn.Module,
    keep: dict[str, Tensor],
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    settings: PruningSettings,
    seed: int,
) -> float:
    """Train the weight-sparse model first-order (masked weights are zero and stay zero) and
    return its test accuracy. The recipe is the digits FO recipe: SGD + momentum, cosine."""
    x_tr, y_tr, x_te, y_te = data
    params = dict(module.named_parameters())
    masks = {n: keep[n].view_as(params[n]).to(params[n].dtype) for n in keep}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    batches = TensorBatches(x_tr, y_tr, batch_size=settings.batch_size, seed=seed)
    opt = build_optimizer(SGDConfig(lr=settings.lr, momentum=settings.momentum),
                          list(params.values()))
    steps_per_epoch = batches.num_batches(0)
    schedule = CosineSchedule(warmup_epochs=settings.warmup_epochs)
    sched = build_scheduler(schedule, opt, settings.epochs * steps_per_epoch, steps_per_epoch)
    module.train()
    for epoch in range(settings.epochs):
        for i in range(steps_per_epoch):
            x, y = batches.batch(epoch, i)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(module(x), y).backward()
            for n, m in masks.items():
                params[n].grad.mul_(m)  # pruned weights get no gradient ...
            opt.step()
            sched.step()
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m)  # ... and stay exactly zero (momentum / decay cannot revive them)
    module.eval()
    with torch.no_grad():
        return float((module(x_te).argmax(1) == y_te).float().mean())


# ----------------------------------------------------------------------- agreement


def mask_agreement(space: ParamSpace, key_zo: Tensor, key_fo: Tensor, keep_zo: Tensor, keep_fo: Tensor,
                   prunable: Tensor) -> dict[str, dict[str, float]]:
    """Per prunable block (and 'all'): Spearman rank correlation of the two ranking keys
    (S for ranking 'largest', |S| for 'abs'), the Jaccard overlap |K_zo & K_fo| / |K_zo | K_fo|
    of the kept coordinates, and the Jaccard two independent uniformly random subsets of the
    same sizes would have in expectation (E|A & B| = ab/n), the chance level to compare with."""
    from scipy.stats import spearmanr

    out: dict[str, dict[str, float]] = {}
    pieces = [(b.name, b.slice) for b in space if bool(prunable[b.slice].all())]
    pieces.append(("all", prunable.nonzero().squeeze(1)))
    for name, sl in pieces:
        a, b = keep_zo[sl], keep_fo[sl]
        n, na, nb = a.numel(), int(a.sum()), int(b.sum())
        union = int((a | b).sum())
        inter_chance = na * nb / n
        chance = inter_chance / (na + nb - inter_chance) if na + nb > inter_chance else 1.0
        za, fa = key_zo[sl].double(), key_fo[sl].double()
        constant = bool((za == za[0]).all() or (fa == fa[0]).all())  # e.g. q tiny: undefined, say so
        rho = float("nan") if constant else spearmanr(za.numpy(), fa.numpy()).statistic
        out[name] = {"spearman": float(rho), "jaccard": int((a & b).sum()) / union if union else 1.0,
                     "jaccard_chance": chance, "kept_zo": na, "kept_fo": nb}
    return out


# ------------------------------------------------------------------------ the study


def _scores_for_seed(settings: PruningSettings, seed: int, data, module_factory):
    x_tr, y_tr = data[0], data[1]
    idx = balanced_indices(y_tr, settings.samples_per_class, seed=seed)
    prune_batch = (x_tr[idx], y_tr[idx])
    torch.manual_seed(seed)
    module = module_factory()
    init_state = {k: v.clone() for k, v in module.state_dict().items()}
    oracle = ModelLossOracle(module, nn.functional.cross_entropy)
    theta = oracle.initial_theta()
    scores: dict[str, Tensor] = {}
    extra: dict[int, Tensor] = {}
    if "random" in settings.methods:
        scores["random"] = random_scores(theta.numel(), seed).to(theta.dtype)
    if "magnitude" in settings.methods:
        scores["magnitude"] = magnitude_scores(theta)
    fo = None
    if "zo-grasp" in settings.methods or "fo-grasp" in settings.methods:
        fo = fo_grasp_scores(module, nn.functional.cross_entropy, *prune_batch, space=oracle.space).scores
        scores["fo-grasp"] = fo
    if "zo-grasp" in settings.methods:
        scores["zo-grasp"] = zo_grasp_scores(oracle, theta, prune_batch, q=settings.q, mu=settings.mu, seed=seed).scores
    for q in settings.agreement_qs:
        extra[q] = zo_grasp_scores(oracle, theta, prune_batch, q=q, mu=settings.mu, seed=seed).scores
    if "fo-grasp" not in settings.methods:
        scores.pop("fo-grasp", None)
    return oracle.space, init_state, scores, fo, extra, dict(oracle.ledger.counts)


def run_experiment(settings: PruningSettings, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(0)
    factory = lambda: make_digits_cnn(settings.width)  # noqa: E731
    variants = [(m, r) for m in settings.methods for r in (settings.rankings if m in GRASP else [None])]
    n_runs = len(settings.seeds) * (1 + len(settings.sparsities) * len(variants))
    bar = tqdm(total=n_runs, desc="pruning runs", disable=not progress, dynamic_ncols=True)
    runs: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    prune_queries: dict[int, dict[str, int]] = {}
    start = time.perf_counter()
    for seed in settings.seeds:
        space, init_state, scores, fo, extra, counts = _scores_for_seed(settings, seed, data, factory)
        prune_queries[seed] = counts
        prunable = prunable_mask(space)  # conv / linear weights; biases stay dense
        module = factory()
        module.load_state_dict(init_state)
        acc = masked_fo_train(module, {}, data, settings, seed)  # dense FO reference, same recipe
        runs.append({"method": "dense", "ranking": "", "sparsity": 0.0, "seed": seed, "test_acc": acc})
        bar.update(1)
        for sparsity in settings.sparsities:
            keeps = {}
            for method, ranking in variants:
                keep = global_keep_mask(scores[method], sparsity, prunable, ranking or "largest")
                keeps[(method, ranking)] = keep
                lr_ = layer_ratios(space, keep, prunable)
                ratios.append({"method": method, "ranking": ranking or "", "sparsity": sparsity, "seed": seed,
                               **{b.name: round(1 - lr_.pruning_ratio(b.name), 4) for b in space
                                  if bool(prunable[b.slice].all())}})
                module = factory()
                module.load_state_dict(init_state)
                views = space.views(keep)
                acc = masked_fo_train(module, {b.name: views[b.name] for b in space if bool(prunable[b.slice].all())},
                                      data, settings, seed)
                runs.append({"method": method, "ranking": ranking or "", "sparsity": sparsity, "seed": seed,
                             "test_acc": acc})
                bar.update(1)
                bar.set_postfix(seed=seed, sparsity=sparsity, last=f"{method}:{acc:.3f}")
            if fo is not None and "zo-grasp" in scores:
                for ranking in settings.rankings:
                    agr = mask_agreement(space, pruning_order_key(scores["zo-grasp"], ranking),
                                         pruning_order_key(fo, ranking), keeps[("zo-grasp", ranking)],
                                         keeps[("fo-grasp", ranking)] if ("fo-grasp", ranking) in keeps
                                         else global_keep_mask(fo, sparsity, prunable, ranking), prunable)
                    for layer, v in agr.items():
                        agreement.append({"q": settings.q, "ranking": ranking, "sparsity": sparsity, "seed": seed,
                                          "layer": layer, **v})
                for q, zo_q in extra.items():
                    for ranking in settings.rankings:
                        agr = mask_agreement(space, pruning_order_key(zo_q, ranking), pruning_order_key(fo, ranking),
                                             global_keep_mask(zo_q, sparsity, prunable, ranking),
                                             global_keep_mask(fo, sparsity, prunable, ranking), prunable)
                        for layer, v in agr.items():
                            agreement.append({"q": q, "ranking": ranking, "sparsity": sparsity, "seed": seed,
                                              "layer": layer, **v})
    bar.close()
    summary = write_outputs(out_dir, settings, runs, agreement, ratios, prune_queries,
                            wall_s=time.perf_counter() - start)
    return summary


# ------------------------------------------------------------------------- outputs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def accuracy_table(runs: list[dict[str, Any]], sparsities: Sequence[float]) -> list[dict[str, Any]]:
    """One row per (method, ranking): mean and std of test accuracy (in %) per sparsity."""
    table = []
    keys = list(dict.fromkeys((r["method"], r["ranking"]) for r in runs if r["method"] != "dense"))
    for method, ranking in keys:
        row: dict[str, Any] = {"method": _row_label(method, ranking or None), "key": method, "ranking": ranking}
        for s in sparsities:
            accs = [100 * r["test_acc"] for r in runs if (r["method"], r["ranking"], r["sparsity"]) == (method, ranking, s)]
            if accs:
                m, sd = _mean_std(accs)
                row[f"mean@{s}"], row[f"std@{s}"], row[f"n@{s}"] = round(m, 2), round(sd, 2), len(accs)
                row[f"at_chance@{s}"] = sum(a < 100 * CHANCE_LEVEL for a in accs)
        table.append(row)
    return table


def write_outputs(out_dir: Path, settings: PruningSettings, runs, agreement, ratios, prune_queries,
                  wall_s: float) -> dict[str, Any]:
    sp = settings.sparsities
    _write_csv(out_dir / "runs.csv", runs)
    _write_csv(out_dir / "layer_ratios.csv", ratios)
    _write_csv(out_dir / "agreement.csv", agreement)
    table = accuracy_table(runs, sp)
    _write_csv(out_dir / "pruning_table.csv", table)
    dense = [100 * r["test_acc"] for r in runs if r["method"] == "dense"]
    dm, dsd = _mean_std(dense) if dense else (float("nan"), 0.0)

    lines = [f"Test accuracy (%) of the weight-sparse digits CNN trained first-order, mean ± std over seeds "
             f"{settings.seeds} ({settings.epochs} epochs, SGD lr {settings.lr}, momentum {settings.momentum}, "
             f"{settings.warmup_epochs:g} warm-up epoch(s), cosine, batch {settings.batch_size}). "
             f"Dense reference: {dm:.2f} ± {dsd:.2f}. ZO-GraSP: q = {settings.q}, mu = {settings.mu}, "
             f"{grasp_query_cost(settings.q)} queries per mask.", "",
             "| method | " + " | ".join(f"{int(round(100 * s))}%" for s in sp) + " |",
             "|---|" + "---|" * len(sp)]
    for row in table:
        cells = [(f"{row[f'mean@{s}']:.2f} ± {row[f'std@{s}']:.2f}"
                  + (f" ({row[f'at_chance@{s}']}/{row[f'n@{s}']} at chance)" if row[f"at_chance@{s}"] else ""))
                 if f"mean@{s}" in row else "–" for s in sp]
        label = row["method"].replace("|", "\\|")  # "|S|" must not split the Markdown cell
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"'at chance': runs that ended below {100 * CHANCE_LEVEL:.0f}% test accuracy (10 classes): the "
              "masked network collapsed (a layer left with almost no weights) or its training died (loss stuck at ln 10)."]
    (out_dir / "pruning_table.md").write_text("\n".join(lines) + "\n")

    agr_lines: list[str] = []
    agr_summary: list[dict[str, Any]] = []
    if agreement:
        layers = list(dict.fromkeys(a["layer"] for a in agreement))
        qs = list(dict.fromkeys(a["q"] for a in agreement))
        for ranking in settings.rankings:
            key = "S" if ranking == "largest" else "|S|"
            agr_lines += [f"ZO- vs FO-GraSP, ranking '{ranking}': Spearman rho of {key} and Jaccard overlap of the "
                          "keep masks per layer (mean ± std over seeds); 'chance' is the expected Jaccard of "
                          "random masks with the same per-layer sizes.", "",
                          "| q | layer | Spearman rho | " + " | ".join(f"Jaccard @{int(round(100 * s))}%" for s in sp)
                          + " | " + " | ".join(f"chance @{int(round(100 * s))}%" for s in sp) + " |",
                          "|---|---|---|" + "---|" * (2 * len(sp))]
            for q in qs:
                for layer in layers:
                    sel = [a for a in agreement if (a["q"], a["layer"], a["ranking"]) == (q, layer, ranking)]
                    rho = _mean_std([a["spearman"] for a in sel if a["sparsity"] == sp[0]])
                    jac = [_mean_std([a["jaccard"] for a in sel if a["sparsity"] == s]) for s in sp]
                    rnd = [statistics.fmean([a["jaccard_chance"] for a in sel if a["sparsity"] == s]) for s in sp]
                    agr_summary.append({"q": q, "ranking": ranking, "layer": layer, "spearman_mean": rho[0],
                                        "spearman_std": rho[1],
                                        **{f"jaccard@{s}": j[0] for s, j in zip(sp, jac)}})
                    agr_lines.append(f"| {q} | {layer} | {rho[0]:.3f} ± {rho[1]:.3f} | "
                                     + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in jac) + " | "
                                     + " | ".join(f"{r:.3f}" for r in rnd) + " |")
            agr_lines.append("")
        (out_dir / "agreement.md").write_text("\n".join(agr_lines))
    best = _best_ranking(runs, settings)
    summary = {
        "settings": asdict(settings),
        "dense_acc_mean": dm, "dense_acc_std": dsd,
        "table": table,
        "agreement": agr_summary,
        "prune_queries_per_seed": prune_queries,
        "better_ranking": best,
        "wall_s": round(wall_s, 1),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_pruning(out_dir / "pruning.png", table, ratios, settings, (dm, dsd))
    except Exception as exc:  # a plot must never lose the numbers
        print(f"could not write pruning.png: {exc}")
    return summary


def _best_ranking(runs, settings: PruningSettings) -> dict[str, Any]:
    """Per GraSP method: the ranking with the higher accuracy averaged over sparsities and seeds."""
    out = {}
    for method in GRASP:
        means = {r: statistics.fmean([x["test_acc"] for x in runs if x["method"] == method and x["ranking"] == r])
                 for r in settings.rankings if any(x["method"] == method and x["ranking"] == r for x in runs)}
        if means:
            out[method] = {"mean_acc": means, "better": max(means, key=means.get)}
    return out


def plot_pruning(path: Path, table, ratios, settings: PruningSettings, dense: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = settings.sparsities
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in table:
        xs = [100 * s for s in sp if f"mean@{s}" in row]
        ax.errorbar(xs, [row[f"mean@{s}"] for s in sp if f"mean@{s}" in row],
                    yerr=[row[f"std@{s}"] for s in sp if f"mean@{s}" in row], marker="o", capsize=3, label=row["method"],
                    ls="--" if row["ranking"] == "abs" else "-")
    ax.axhline(dense[0], color="k", lw=0.8, ls=":", label=f"dense FO ({dense[0]:.1f})")
    ax.set_xlabel("sparsity of conv/linear weights [%]")
    ax.set_ylabel("test accuracy [%] (sparse model, FO-trained)")
    ax.set_title(f"digits CNN, mean ± std over {len(settings.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    # Layer-wise kept fraction at the highest sparsity <= 0.9: the LPRs each method implies.
    s_show = max([s for s in sp if s <= 0.9] or sp)
    layers = [k for k in (ratios[0] if ratios else {}) if k not in ("method", "ranking", "sparsity", "seed")]
    variants = list(dict.fromkeys((r["method"], r["ranking"]) for r in ratios))
    width = 0.8 / max(1, len(variants))
    for i, (m, rk) in enumerate(variants):
        vals = [statistics.fmean([r[l] for r in ratios if (r["method"], r["ranking"], r["sparsity"]) == (m, rk, s_show)])
                for l in layers]
        bx.bar([j + i * width for j in range(len(layers))], vals, width, label=_row_label(m, rk or None))
    bx.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
    bx.set_ylabel("kept fraction of the layer")
    bx.set_title(f"layer-wise kept fraction at {int(round(100 * s_show))}% global sparsity")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blackbox-zo experiment pruning", description=__doc__.split("\n\n")[0])
    d = PruningSettings()
    p.add_argument("--sparsities", type=_floats, default=d.sparsities, help="comma list in [0, 1)")
    p.add_argument("--methods", type=lambda t: [x for x in t.split(",") if x], default=d.methods,
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--rankings", type=lambda t: [x for x in t.split(",") if x], default=d.rankings,
                   help="GraSP rankings: largest (prune the largest S), abs (keep the largest |S|)")
    p.add_argument("--seeds", type=_ints, default=d.seeds)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--q", type=int, default=d.q, help="RGE directions of ZO-GraSP")
    p.add_argument("--mu", type=float, default=d.mu)
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class)
    p.add_argument("--agreement-qs", type=_ints, default=[], help="extra q values for the agreement table only")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/pruning/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _validate(s: PruningSettings) -> str | None:
    if not s.sparsities or any(not 0 <= x < 1 for x in s.sparsities):
        return f"--sparsities: each must be in [0, 1), got {s.sparsities}"
    bad = [m for m in s.methods if m not in METHODS]
    if bad or not s.methods:
        return f"--methods: allowed {', '.join(METHODS)}, got {s.methods}"
    bad = [r for r in s.rankings if r not in ("largest", "abs")]
    if bad or not s.rankings:
        return f"--rankings: allowed largest, abs, got {s.rankings}"
    for name, value, lo in (("--epochs", s.epochs, 1), ("--batch-size", s.batch_size, 1), ("--width", s.width, 1),
                            ("--q", s.q, 1), ("--samples-per-class", s.samples_per_class, 1), ("--threads", s.threads, 1)):
        if value < lo:
            return f"{name}: must be >= {lo}, got {value}"
    if not s.seeds or any(x < 0 for x in s.seeds):
        return f"--seeds: need one or more seeds >= 0, got {s.seeds}"
    if s.warmup_epochs < 0:
        return f"--warmup-epochs: must be >= 0, got {s.warmup_epochs}"
    if not s.lr > 0 or not s.mu > 0:
        return f"--lr and --mu must be > 0, got {s.lr}, {s.mu}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Pruning quality on digits: random / magnitude / ZO-GraSP / FO-GraSP masks, FO-trained (Table A2)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    settings = PruningSettings(
        sparsities=args.sparsities, methods=args.methods, rankings=args.rankings, seeds=args.seeds,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs, width=args.width, q=args.q, mu=args.mu,
        samples_per_class=args.samples_per_class, agreement_qs=args.agreement_qs, threads=args.threads)
    err = _validate(settings)
    if err:
        print(f"blackbox-zo experiment pruning: error: {err}")
        return 2
    if args.out:
        out = Path(args.out)
    else:
        out = make_run_dir("runs/experiments", "pruning")
    summary = run_experiment(settings, out, progress=not args.no_progress)
    print((out / "pruning_table.md").read_text())
    if (out / "agreement.md").exists():
        print((out / "agreement.md").read_text())
    for method, v in summary["better_ranking"].items():
        print(f"{method}: better ranking on digits = {v['better']} "
              f"(mean acc over sparsities/seeds: {', '.join(f'{k} {100 * a:.2f}%' for k, a in v['mean_acc'].items())})")
    print(f"wrote {out} (wall {summary['wall_s']:.0f}s)")
    return 0
