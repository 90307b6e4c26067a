"""Latency of one gloo collective between 2 local processes: what a 2-rank CGE step pays once.

    .venv/bin/python benchmarks/bench_collective.py
    .venv/bin/python benchmarks/bench_collective.py --sizes 16,3827,65536 --iters 400

Two processes (spawned, one thread each) join a gloo group on localhost and time, interleaved
and after a barrier each time (so both enter together): `all_reduce` of a float64 vector of each
size (3,827 = the digits CNN's 3,818 losses plus the sharder's slots), `all_gather` of the same,
and a `barrier`. Medians of wall and CPU microseconds per call, per rank. If the sizes cost the
same, the collective is latency-bound (a handoff to gloo's worker thread and a loopback round
trip), and neither a smaller payload nor another collective makes a step cheaper.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from local_ranks import run_two_processes


def _worker(rank: int, port: int, sizes: list[int], iters: int, queue) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ops = {}
    for n in sizes:
        t = torch.zeros(n, dtype=torch.float64)
        outs = [torch.empty_like(t) for _ in range(2)]
        ops[f"all_reduce {n}"] = lambda t=t: dist.all_reduce(t)
        ops[f"all_gather {n}"] = lambda t=t, outs=outs: dist.all_gather(outs, t)
    ops["barrier"] = dist.barrier
    times = {k: ([], []) for k in ops}
    for it in range(iters + 20):
        for name, op in ops.items():
            dist.barrier()
            w, c = time.perf_counter(), time.process_time()
            op()
            if it >= 20:  # warm-up: connections, first allocations
                times[name][0].append(time.perf_counter() - w)
                times[name][1].append(time.process_time() - c)
    queue.put((rank, {k: (statistics.median(w) * 1e6, statistics.median(c) * 1e6) for k, (w, c) in times.items()}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16,3827,65536", help="float64 elements per collective, comma-separated")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.iters < 1:
        ap.error("--sizes must be >= 1 each and --iters >= 1")
    pairs, load = run_two_processes(_worker, (sizes, args.iters), timeout=600)
    results = dict(pairs)
    print(f"gloo, 2 local processes, one thread each, median of {args.iters} calls; load average "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs")
    print(f"  {'collective':<20} {'rank 0 wall us':>15} {'CPU us':>8} {'rank 1 wall us':>15} {'CPU us':>8}")
    for name in results[0]:
        (w0, c0), (w1, c1) = results[0][name], results[1][name]
        print(f"  {name:<20} {w0:15.0f} {c0:8.0f} {w1:15.0f} {c1:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
