"""What splitting a CGE step in two costs without any communication: the work every rank repeats.

    .venv/bin/python benchmarks/bench_split_overhead.py

One process, one thread, the digits CNN at batch 64 with feature reuse (as `bench_parallel.py`):
CPU seconds of a full forward-CGE step over all 3,818 coordinates, of the two halves of the
coordinate set each as its own step (base loss and the step's unperturbed forward included, as on
every rank), and of the base forward alone; median of --steps steps at a new theta and batch each.
(half 1 + half 2 - full) / full is the share of a step that 2 ranks repeat: the most a lock-step
2-rank step can lose to duplicated work, before communication, imbalance and waiting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from local_ranks import dense_digits_cge  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--cut", type=int, default=390,
                    help="first coordinate of the second half (390: inside the second conv's weights, about where "
                         "bench_parallel's balanced cut lands with feature reuse; 1500 was the cut of equal cost "
                         "before the reuse speed-ups)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y, oracle, theta0, drift, estimator = dense_digits_cge()
    everything = torch.arange(theta0.numel())

    def timed(theta, batch, coords) -> float:
        t = time.process_time()
        if coords is None:
            oracle.losses(theta.unsqueeze(0), batch)
        else:
            estimator.estimate(oracle, theta, batch, coords=coords)
        return time.process_time() - t

    cases = {"full": everything, "first": everything[:args.cut], "second": everything[args.cut:], "base": None}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for s in range(args.steps + 2):  # interleaved, so that a change in the machine's load hits every case
        batch = (x[(s % 20) * 64:(s % 20 + 1) * 64], y[(s % 20) * 64:(s % 20 + 1) * 64])
        for k, (name, coords) in enumerate(cases.items()):
            theta = theta0 + (4 * s + k + 1) * drift  # a new point for every case and step: no cache carries over
            oracle.on_step(theta, batch)
            t = timed(theta, batch, coords)
            if s >= 2:  # warm-up: tracing, chunk sizing
                times[name].append(t)
    full, first, second, base = (statistics.median(times[k]) for k in ("full", "first", "second", "base"))
    extra = first + second - full
    print(f"digits CNN, batch 64, {theta0.numel()} coordinates, 1 thread, CPU ms per step (median of {args.steps}, "
          f"interleaved)")
    print(f"  full step {full * 1e3:.1f}; base forward alone {base * 1e3:.2f}; halves (cut at {args.cut}) "
          f"{first * 1e3:.1f} + {second * 1e3:.1f} = {(first + second) * 1e3:.1f}")
    print(f"  repeated by splitting: {extra * 1e3:.1f} ms = {100 * extra / full:.1f}% of a full step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
