"""HZO study (`blackbox-zo experiment hzo`): HZO's Fig. 1 and Fig. 4 at digits scale, and digits training.

1. Cosine similarity to backprop against depth (HZO Fig. 1). Staged CNNs on 8x8 digits:
   a stem conv 1->C, `depth` body blocks, a linear head. "plain": relu(conv(h)) (He init);
   "residual": h + s * conv(relu(h)) with s = 1/sqrt(depth), so the network stays near the
   unitary Lipschitz limit HZO's abstract names. Estimators, in float32 on one batch:
   HZO (midpoint split), the layer-by-layer chain (O(M L)), and weight-space RGE with as many
   full forward passes as HZO used ("standard ZO" at equal cost); `--with-direct` adds the
   O(M L^2) scheme (every target straight from the loss).
2. Query count against depth (HZO Fig. 4): stage queries of HZO (with and without spatial
   parallel perturbation), chain and direct, as measured by the ledger (batch of 1: counts do
   not depend on the batch), against CGE's (d + 1) loss queries, each a full pass of
   num_stages + 1 stage queries, and CGE with stage-level feature reuse.
3. Digits trained with HZO (a residual staged CNN) against first-order backprop, same recipe.

Defaults take a few minutes on 2 CPU cores (depths 16/32/64, C = 4, batch 16; counts to depth
64; training depth 4, 8 epochs). Outputs under --out (default runs/experiments/hzo/<timestamp>/):
cosine.{csv,md,png}, queries.{csv,md,png}, train.{csv,md}, train_curves.png, summary.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from blackbox_zo.estimators import RGE
from blackbox_zo.contrib.hzo import HZO, TorchStages
from blackbox_zo.problem import TensorBatches
from oracles.model_loss import ModelLossOracle
from problems.digits import load_digits_split

from .args import int_list, positive
from .tables import experiment_dir, write_table

__all__ = ["make_staged_cnn", "autograd_grad", "cosine", "cosine_vs_depth", "query_counts", "train_digits_hzo", "main"]


# ------------------------------------------------------------------------------- models


class PlainBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return F.relu(self.conv(h))


class ResidualBlock(nn.Module):
    """h + scale * conv(relu(h)): Lipschitz <= 1 + scale ||conv||, near 1 for scale ~ 1/sqrt(depth)."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        return h + self.scale * self.conv(F.relu(h))


class LinearHead(nn.Module):
    def __init__(self, features: int, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h.flatten(1))


def make_staged_cnn(depth: int, channels: int = 4, residual: bool = True, scale: float | None = None,
                    size: int = 8, seed: int = 0) -> tuple[nn.Sequential, list[int | None]]:
    """stem conv 1->C (radius 1), `depth` blocks (radius 1 each), linear head: depth + 2 stages."""
    torch.manual_seed(seed)
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    body = [ResidualBlock(channels, scale) if residual else PlainBlock(channels) for _ in range(depth)]
    for block in body:
        nn.init.kaiming_normal_(block.conv.weight, nonlinearity="relu")
        nn.init.zeros_(block.conv.bias)
    net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), *body, LinearHead(channels * size * size))
    return net, [1] * (depth + 1) + [None]


def autograd_grad(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """The backprop reference: gradient of the mean cross-entropy, flat in parameter order."""
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]).detach(), float(loss.detach())


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def digits_batch(n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    idx = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))[:n]
    return x_tr[idx], y_tr[idx], x_tr, y_tr, x_te, y_te


# ---------------------------------------------------------------------- 1. cosine vs depth


def cosine_vs_depth(depths: Sequence[int], channels: int, batch: int, mu: float, seeds: Sequence[int],
                    with_direct: bool, progress: bool = True) -> list[dict[str, Any]]:
    jobs = [(d, kind, s) for d in depths for kind in ("plain", "residual") for s in seeds]
    rows = []
    for depth, kind, seed in tqdm(jobs, desc="cosine vs depth", disable=not progress, dynamic_ncols=True):
        net, radii = make_staged_cnn(depth, channels, residual=kind == "residual", seed=seed)
        x, y, *_ = digits_batch(batch, seed)
        g, loss = autograd_grad(net, x, y)
        staged = TorchStages(net, radii=radii)
        theta = staged.theta()
        stages = staged.num_stages + 1  # stage queries in one full forward pass (the loss is a stage)
        row = {"depth": depth, "network": kind, "seed": seed, "d": theta.numel(), "loss": loss,
               "grad_norm": float(g.norm())}
        splits = ["midpoint", "chain"] + (["direct"] if with_direct else [])
        for split in splits:
            est = HZO(mu=mu, split=split)
            start = time.perf_counter()
            e = est.estimate(staged, theta, (x, y))
            name = "hzo" if split == "midpoint" else split
            row[f"cos_{name}"] = cosine(e.grad, g)
            row[f"queries_{name}"] = e.queries
            row[f"seconds_{name}"] = round(time.perf_counter() - start, 2)
        # "Standard ZO" at equal cost: weight-space RGE with as many full passes as HZO used.
        q = max(1, row["queries_hzo"] // stages - 1)
        oracle = ModelLossOracle(net)
        e = RGE(q=q, mu=mu).estimate(oracle, theta, (x, y), seed=seed)
        row["cos_rge_equal_cost"], row["rge_q"] = cosine(e.grad, g), q
        rows.append(row)
    return rows


def plot_cosine(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    methods = [m for m in ("hzo", "chain", "direct", "rge_equal_cost") if f"cos_{m}" in rows[0]]
    labels = {"hzo": "HZO (midpoint)", "chain": "chain (layer by layer)", "direct": "direct (O(ML^2))",
              "rge_equal_cost": "RGE, same forward passes"}
    styles = {"plain": "--", "residual": "-"}
    for kind in ("plain", "residual"):
        for i, m in enumerate(methods):
            pts = sorted({r["depth"] for r in rows})
            ys = [sum(r[f"cos_{m}"] for r in rows if r["depth"] == d and r["network"] == kind)
                  / max(1, sum(1 for r in rows if r["depth"] == d and r["network"] == kind)) for d in pts]
            ax.plot(pts, ys, styles[kind], marker="o", color=f"C{i}", label=f"{labels[m]}, {kind}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth L (body blocks)")
    ax.set_ylabel("cosine similarity to backprop")
    ax.set_ylim(-0.1, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("HZO Fig. 1 at digits scale (float32; solid: residual, dashed: plain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- 2. query counts


def query_counts(depths: Sequence[int], channels: int, with_direct: bool, progress: bool = True) -> list[dict[str, Any]]:
    rows = []
    x, y, *_ = digits_batch(1, 0)
    for depth in tqdm(list(depths), desc="query counts", disable=not progress, dynamic_ncols=True):
        net, radii = make_staged_cnn(depth, channels, residual=True)
        staged = TorchStages(net, radii=radii)
        theta = staged.theta()
        n = staged.num_stages + 1
        d_stage = [staged.stage_slice(l).stop - staged.stage_slice(l).start for l in range(1, staged.num_stages + 1)]
        d = sum(d_stage)
        row = {"depth": depth, "stages_incl_loss": n, "d": d, "width_M": channels * 64}
        variants = [("hzo", "midpoint", True), ("hzo_no_spp", "midpoint", False), ("chain", "chain", True)]
        if with_direct:
            variants.append(("direct", "direct", True))
        for name, split, spp in variants:
            est = HZO(split=split, spatial_parallel=spp)
            e = est.estimate(staged, theta, (x, y))
            row[name] = e.queries
            if name == "hzo":
                row["hzo_activation"], row["hzo_weights"] = est.last_counts.activation, est.last_counts.weights
        row["hzo_formula_M_n/2_log2n"] = round(channels * 64 * n / 2 * math.log2(n))
        row["cge"] = (d + 1) * n  # d + 1 loss queries, each a full pass of n stage queries
        # stage-level feature reuse: a weight of stage l re-evaluates stages l..L and the loss
        row["cge_reuse"] = n + sum(dl * (n - l + 1) for l, dl in enumerate(d_stage, start=1))
        rows.append(row)
    return rows


def plot_queries(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    depths = [r["depth"] for r in rows]
    series = [("cge", "CGE (d+1 full passes)"), ("cge_reuse", "CGE, stage feature reuse"),
              ("direct", "direct, O(ML^2)"), ("hzo_no_spp", "HZO"), ("hzo", "HZO + spatial parallel"),
              ("chain", "chain, O(ML)"), ("hzo_activation", "HZO activation part only")]
    for i, (key, label) in enumerate(series):
        if key in rows[0]:
            ax.plot(depths, [r[key] for r in rows], marker="o", label=label, color=f"C{i}",
                    ls=":" if key == "hzo_activation" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L (body blocks)")
    ax.set_ylabel("stage queries per gradient estimate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("HZO Fig. 4 at digits scale (C=%d, 8x8)" % (rows[0]["width_M"] // 64))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------- 3. training


def train_digits_hzo(depth: int, channels: int, epochs: int, batch_size: int, lr: float, mu: float,
                     methods: Sequence[str] = ("hzo", "fo"), seed: int = 0, progress: bool = True) -> tuple[list, list]:
    """Train the residual staged CNN on digits with HZO (queries only) and with backprop; same recipe."""
    _, _, x_tr, y_tr, x_te, y_te = digits_batch(1, seed)
    results, curves = [], []
    for method in methods:
        net, radii = make_staged_cnn(depth, channels, residual=True, seed=seed)
        staged = TorchStages(net, radii=radii)
        params = list(net.parameters())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        batches = TensorBatches(x_tr, y_tr, batch_size=batch_size, seed=seed)
        steps = epochs * batches.num_batches(0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        est = HZO(mu=mu)
        start = time.perf_counter()
        bar = tqdm(total=steps, desc=f"digits {method}", disable=not progress, dynamic_ncols=True)
        for epoch in range(epochs):
            for i in range(batches.num_batches(epoch)):
                batch = batches.batch(epoch, i)
                if method == "hzo":
                    e = est.estimate(staged, staged.theta(), batch)
                    staged.space.write_grad(params, e.grad)
                    loss = e.base_loss
                else:
                    opt.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        out = F.cross_entropy(net(batch[0]), batch[1])
                        out.backward()
                    loss = float(out.detach())
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            with torch.no_grad():
                acc = float((net(x_te).argmax(1) == y_te).float().mean())
            curves.append({"method": method, "epoch": epoch + 1, "test_acc": acc,
                           "stage_queries": staged.ledger.total, "wall_s": round(time.perf_counter() - start, 1)})
        bar.close()
        results.append({"method": "HZO (queries only)" if method == "hzo" else "backprop (first-order reference)",
                        "depth": depth, "channels": channels, "d": staged.space.dim, "epochs": epochs,
                        "lr": lr, "test_acc": curves[-1]["test_acc"], "stage_queries": staged.ledger.total,
                        "full_pass_equivalents": staged.ledger.total // (staged.num_stages + 1),
                        "wall_s": round(time.perf_counter() - start, 1)})
    return results, curves


def plot_training(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, method in enumerate(dict.fromkeys(c["method"] for c in curves)):
        pts = [c for c in curves if c["method"] == method]
        ax.plot([c["epoch"] for c in pts], [c["test_acc"] for c in pts], marker="o", color=f"C{i}",
                label={"hzo": "HZO", "fo": "backprop"}.get(method, method))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("digits, residual staged CNN")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blackbox-zo experiment hzo", description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int_list, default=[16, 32, 64], help="body depths for the cosine study (default 16,32,64)")
    p.add_argument("--count-depths", type=int_list, default=[2, 4, 8, 16, 32, 64], help="depths for the query counts")
    p.add_argument("--channels", type=positive(int), default=4, help="channels C of every body block (width M = 64 C)")
    p.add_argument("--batch", type=positive(int), default=16, help="batch size of the cosine study")
    p.add_argument("--mu", type=positive(float), default=1e-3, help="finite-difference step (activations and weights)")
    p.add_argument("--seeds", type=int_list, default=[1], help="seeds of the cosine study (nets and batches)")
    p.add_argument("--with-direct", action="store_true", help="also the O(M L^2) direct scheme (slow at depth 64)")
    p.add_argument("--train-depth", type=positive(int), default=4)
    p.add_argument("--train-channels", type=positive(int), default=4)
    p.add_argument("--train-epochs", type=positive(int), default=8)
    p.add_argument("--train-batch", type=positive(int), default=32)
    p.add_argument("--train-lr", type=positive(float), default=0.05)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: cosine, queries, train")
    p.add_argument("--threads", type=positive(int), default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/hzo/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"cosine", "queries", "train"}
    if unknown:
        print(f"blackbox-zo experiment hzo: error: --skip: unknown part(s) {sorted(unknown)}; allowed: cosine, queries, train")
        return 2
    torch.set_num_threads(args.threads)
    out = experiment_dir(args.out, "hzo")
    progress = not args.no_progress
    summary = [f"# HZO study\n\ncommand: `blackbox-zo experiment hzo {' '.join(argv or [])}`\n"]
    if "cosine" not in skip:
        rows = cosine_vs_depth(args.depths, args.channels, args.batch, args.mu, args.seeds, args.with_direct, progress)
        cols = ["depth", "network", "seed", "d", "loss", "grad_norm"] + [k for k in rows[0] if k.startswith(("cos_", "queries_", "rge_q"))]
        summary.append("## Cosine similarity to backprop (float32)\n\n" + write_table(rows, out / "cosine", cols))
        plot_cosine(rows, out / "cosine.png")
    if "queries" not in skip:
        rows = query_counts(args.count_depths, args.channels, args.with_direct, progress)
        summary.append("## Stage queries per estimate\n\n" + write_table(rows, out / "queries"))
        plot_queries(rows, out / "queries.png")
    if "train" not in skip:
        results, curves = train_digits_hzo(args.train_depth, args.train_channels, args.train_epochs, args.train_batch,
                                           args.train_lr, args.mu, progress=progress)
        summary.append("## Digits training\n\n" + write_table(results, out / "train"))
        write_table(curves, out / "train_curves")
        plot_training(curves, out / "train_curves.png")
    (out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
