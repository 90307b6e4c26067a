"""Queries per CPU second of a population that varies only in late layers: the shared first layers
run once (ModelLossOracle's shared-prefix path) vs the whole grouped population forward.

    python benchmarks/bench_population_prefix.py                      # digits CNN width 8, P = 56, batch 64
    python benchmarks/bench_population_prefix.py --width 32 --population 28 --budget-s 6

An ES restricted to the last layer (`estimator.blocks=["6"]`, the digits two-phase default's phase
1) perturbs only that layer, so every member computes the same convolutions. Paths, each giving
the P losses of one batch:
  whole    blackbox_zo.population.PopulationForward.losses on every layer (grouped convolutions,
           batched matrix products: what the oracle ran before the shared-prefix path)
  prefix   ModelLossOracle.losses: the conv layers once on the batch, the last layer per member
interleaved (slices of each, alternating, until the slower has used --budget-s CPU seconds) so that both see the
same load on a shared machine; rates are per CPU second of this one-thread process, and the
ratio prefix / whole is measured in this run. The largest relative difference of the losses is
printed beside (they agree to rounding: the same operations on the same values).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from oracles.model_loss import ModelLossOracle
from problems.digits import load_digits_split, make_digits_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--population", type=int, default=56, help="members (2q of an ES with q pairs)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=3.0, help="CPU seconds per path (about)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y, _, _ = load_digits_split(0)
    x, y = x[: args.batch], y[: args.batch]
    torch.manual_seed(args.seed)
    module = make_digits_cnn(args.width)
    oracle = ModelLossOracle(module)
    theta = oracle.initial_theta()
    last = oracle.space.coords_of([str(len(module) - 1)])
    gen = torch.Generator().manual_seed(args.seed)
    thetas = theta.repeat(args.population, 1)
    thetas[:, last] += 0.1 * torch.randn(args.population, last.numel(), generator=gen)
    ce = nn.functional.cross_entropy
    paths = {"whole": lambda: oracle.population.losses(thetas, x, y, ce),
             "prefix": lambda: oracle.losses(thetas, (x, y))}
    outs = {k: fn() for k, fn in paths.items()}  # warm-up, and the values compared
    assert oracle._shared_prefix(thetas) is not None, "the shared-prefix path was not taken"
    cpu = {k: 0.0 for k in paths}
    calls = {k: 0 for k in paths}
    while max(cpu.values()) < args.budget_s or min(calls.values()) < 3:
        for k, fn in paths.items():
            c0 = time.process_time()
            for _ in range(5):
                fn()
            cpu[k] += time.process_time() - c0
            calls[k] += 5
    rate = {k: calls[k] * args.population / cpu[k] for k in paths}
    diff = float(((outs["prefix"] - outs["whole"]) / outs["whole"].abs()).abs().max())
    print(f"digits CNN width {args.width} (d = {theta.numel():,}), {args.population} members varying in the last "
          f"layer ({last.numel():,} parameters), batch {args.batch}, one thread")
    for k in paths:
        print(f"  {k:6s} {calls[k]:5d} calls in {cpu[k]:6.2f} CPU s -> {rate[k]:9.0f} queries/CPU-s")
    print(f"  prefix / whole: {rate['prefix'] / rate['whole']:.2f}x  (max rel. diff of the losses {diff:.1e})")


if __name__ == "__main__":
    main()
