"""Where a 2-rank dense CGE step's time goes, per rank: base forward, shard, all-reduce, the rest.

    .venv/bin/python benchmarks/profile_parallel_step.py            # digits CNN, batch 64, 40 steps

Two ranks (spawned, one thread each, gloo on localhost) run forward CGE over all 3,818 digits
coordinates with the default balanced `PlanSharder`, at a new theta and batch every step, as
`bench_parallel.py`'s balanced mode does. The executor's calls are wrapped with timers (wall and
CPU seconds of the process): the base loss (`oracle.query`), the rank's shard
(`oracle.query_coordinates`), every all-reduce (`torch.distributed.all_reduce`), and the whole
step; "rest" is the step less those. Medians over the steps after the first 8 (calibration and
refinement). Compare a rank's step with half of `bench_split_overhead.py`'s full step (one
process): the difference is what 2 ranks add per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from local_ranks import dense_digits_cge, run_two_processes  # noqa: E402


def _worker(rank: int, port: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    from blackbox_zo import parallel

    x, y, oracle, theta0, drift, estimator = dense_digits_cge()
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    parallel.init_from_env(None)
    sharder = parallel.PlanSharder()
    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc = spent.setdefault(name, [0.0, 0.0])
                acc[0] += time.perf_counter() - w
                acc[1] += time.process_time() - c
        return wrapper

    # public entry points only: the executor's base query and shard go through the oracle's
    # accounting wrappers, the sharder's all-reduce through torch.distributed
    torch.distributed.all_reduce = timed("all-reduce", torch.distributed.all_reduce)
    oracle.query = timed("base forward", oracle.query)
    oracle.query_coordinates = timed("shard", oracle.query_coordinates)
    rows = []
    for s in range(steps + 8):
        batch = (x[(s % 20) * 64:(s % 20 + 1) * 64], y[(s % 20) * 64:(s % 20 + 1) * 64])
        spent.clear()
        w, c = time.perf_counter(), time.process_time()
        estimator.estimate(oracle, theta0 + (s + 1) * drift, batch, sharder=sharder)
        step = (time.perf_counter() - w, time.process_time() - c)
        if s >= 8:
            row = {k: tuple(v) for k, v in spent.items()}
            row["rest"] = tuple(step[i] - sum(v[i] for v in spent.values()) for i in range(2))
            row["step"] = step
            rows.append(row)
    med = {k: (statistics.median(r[k][0] for r in rows) * 1e3, statistics.median(r[k][1] for r in rows) * 1e3)
           for k in rows[0]}
    queue.put((rank, med, sharder._bounds))
    parallel.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps (after 8 untimed)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    results, load = run_two_processes(_worker, (args.steps,), timeout=900)
    results.sort()
    print(f"2 ranks, digits CNN, batch 64, 3,818 coordinates, 1 thread each; medians of {args.steps} steps, "
          f"ms per step (wall / CPU); load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    for rank, med, bounds in results:
        parts = "  ".join(f"{k} {w:.2f} / {c:.2f}" for k, (w, c) in med.items())
        print(f"  rank {rank} (cut {bounds}): {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
