"""ZO-GraSP on digits with common directions (the block sampler) vs the old per-chunk sampler, against FO-GraSP.

    .venv/bin/python benchmarks/grasp_directions_study.py --seeds 0-9

Before the block sampler, ZO-GraSP's second RGE call (at theta + mu g) drew 128 of its 192 directions
afresh (the oracle's chunk shrinks from 256 to 65 once it has seen the pruning batch, and the old
sampler's directions depended on the chunk), so eq. (3)'s difference g(theta + mu g) - g(theta) was
mostly the noise of two independent estimates. This script computes, for each seed, on the digits
recipe's own pruning batch and initialisation (problems/digits.py: 25 images per class, the CNN of
width 8 seeded run.seed), the ZO-GraSP scores with both samplers (`OldSeededDirections` of
bench_directions.py reproduces the old one, with the chunks an oracle gives: 256, then 65) and the
FO-GraSP scores (eq. (2) by double backward, problems/experiments/fo_grasp_reference.py). Printed
per seed: how many of the q directions the two calls shared; the Spearman rho of the ZO scores
against FO's (S itself, the `largest` ranking's key, and |S|, the `abs` key); and the kept fraction
of each layer at the recipe's 90% sparsity (the layer-wise ratios, all the recipe keeps of ZO-GraSP),
with FO-GraSP's and uniform (random) ratios for reference. No training: a few seconds per seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blackbox_zo.estimators as estimators_module  # noqa: E402
from bench_directions import OldSeededDirections  # noqa: E402
from blackbox_zo.sparsity import (  # noqa: E402
    balanced_indices,
    global_keep_mask,
    layer_ratios,
    prunable_mask,
    zo_grasp_scores,
)
from oracles.model_loss import ModelLossOracle  # noqa: E402
from problems.digits import load_digits_split, make_digits_cnn  # noqa: E402
from problems.experiments.fo_grasp_reference import fo_grasp_scores  # noqa: E402
from seed_study import parse_seeds  # noqa: E402

SPARSITY, Q, MU, PER_CLASS = 0.9, 192, 5e-3, 25


class RecordingOracle(ModelLossOracle):
    """Keeps the perturbed vectors of each call (to count the directions the two RGE calls share)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[torch.Tensor] = []

    def losses(self, thetas, batch):
        self.asked.append(thetas.clone())
        return super().losses(thetas, batch)


def one_seed(seed: int, old: bool) -> dict:
    x_tr, y_tr, _, _ = load_digits_split(0)
    idx = balanced_indices(y_tr, PER_CLASS, seed=seed)
    batch = (x_tr[idx], y_tr[idx])
    torch.manual_seed(seed)
    module = make_digits_cnn(8)
    oracle = RecordingOracle(module, nn.functional.cross_entropy)
    theta = oracle.initial_theta()
    saved = estimators_module.SeededDirections
    if old:
        estimators_module.SeededDirections = OldSeededDirections  # what RGE.plan builds
    try:
        res = zo_grasp_scores(oracle, theta, batch, q=Q, mu=MU, seed=seed)
    finally:
        estimators_module.SeededDirections = saved
    # call 1: the base, then q perturbed vectors; call 2 likewise at theta + mu g
    points = torch.cat(oracle.asked)
    first, second = points[: Q + 1], points[Q + 1 :]
    u1, u2 = (first[1:] - first[0]) / MU, (second[1:] - second[0]) / MU
    shared = int(((u1 - u2).abs().amax(dim=1) < 1e-2).sum())  # float32: recovery error ~1e-5 / MU
    fo = fo_grasp_scores(module, nn.functional.cross_entropy, *batch, space=oracle.space).scores
    prunable = prunable_mask(oracle.space)
    w = prunable.nonzero().squeeze(1)
    ratios = {}
    for name, scores in (("zo", res.scores), ("fo", fo)):
        lr = layer_ratios(oracle.space, global_keep_mask(scores, SPARSITY, prunable, "largest"), prunable)
        ratios[name] = {b: lr.keep[b] / lr.numel[b] for b in lr.keep if lr.prunable.get(b, True)}
    return {"shared": shared,
            "rho_s": float(spearmanr(res.scores[w].double(), fo[w].double()).statistic),
            "rho_abs": float(spearmanr(res.scores[w].abs().double(), fo[w].abs().double()).statistic),
            "ratios": ratios["zo"], "fo_ratios": ratios["fo"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-9", help="run.seed values (default 0-9)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    rows = {"old": [], "new": []}
    print(f"ZO-GraSP on digits (q = {Q}, mu = {MU}, {PER_CLASS} images per class), old per-chunk sampler vs blocks; "
          f"kept fraction per layer at {SPARSITY:.0%} sparsity (`largest`)\n")
    for seed in seeds:
        for which in ("old", "new"):
            r = one_seed(seed, which == "old")
            rows[which].append(r)
            kept = " / ".join(f"{v:.3f}" for v in r["ratios"].values())
            fo = " / ".join(f"{v:.3f}" for v in r["fo_ratios"].values())
            print(f"seed {seed} {which}: shared {r['shared']:3d}/{Q}  rho(S) {r['rho_s']:+.3f}  rho(|S|) {r['rho_abs']:+.3f}"
                  f"  kept {kept}   (FO {fo})", flush=True)
    names = list(rows["old"][0]["ratios"])
    print(f"\nmean ± std over seeds {args.seeds}; kept fractions of {' / '.join(names)}")
    for which in ("old", "new"):
        rs = rows[which]
        rho_s = [r["rho_s"] for r in rs]
        rho_abs = [r["rho_abs"] for r in rs]
        kept = [statistics.mean(r["ratios"][n] for r in rs) for n in names]
        print(f"{which}: shared {statistics.mean(r['shared'] for r in rs):.0f}/{Q}  rho(S) {statistics.mean(rho_s):+.3f} "
              f"± {statistics.stdev(rho_s):.3f}  rho(|S|) {statistics.mean(rho_abs):+.3f} ± {statistics.stdev(rho_abs):.3f}"
              f"  kept {' / '.join(f'{k:.3f}' for k in kept)}")
    fo_kept = [statistics.mean(r["fo_ratios"][n] for r in rows["new"]) for n in names]
    print(f"FO-GraSP: kept {' / '.join(f'{k:.3f}' for k in fo_kept)};  uniform: {1 - SPARSITY:.3f} in every layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
