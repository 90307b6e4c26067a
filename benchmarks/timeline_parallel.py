"""Per-step timelines of a 2-rank dense CGE step against the machine's 2-process ceiling, in one run.

    .venv/bin/python benchmarks/timeline_parallel.py                  # 30 timed steps, 3 rounds
    .venv/bin/python benchmarks/timeline_parallel.py --steps 60 --rounds 5

`bench_parallel.py` reports one ratio per configuration (ranks / independent processes); this
script takes that ratio apart. Two spawned processes, one thread each, run the dense digits CGE
step of `bench_parallel.py` (all 3,818 coordinates, batch 64, feature reuse, a new theta and batch
every step) in four modes, interleaved round by round so that a change of load hits all of them:

* ``solo``: one process alone (the other idles): the reference step;
* ``ceiling``: both processes, unconnected, each the whole step (bench_parallel's "independent");
* ``halves``: both processes, unconnected, each the base forward plus its half of the coordinates
  (the cut the ranks converged to in the same round), no communication: what splitting the work
  costs without any collective or lock-step;
* ``ranks``: a gloo group, the default balanced `PlanSharder` (what `torchrun` runs).

Every process starts its timed steps at a barrier. Per step it records the wall interval, its
process CPU time (all threads), the CPU time of its main thread, and, for ranks, the wall and CPU
time inside the all-reduce and the moment it entered it (both ranks share one monotonic clock, so
the difference of entry times is how long the earlier rank waited for the later one).
Printed, per mode: median per-step wall and CPU ms; per full step of work (a ceiling process does
one full step, a rank half of one); and the ratios to the ceiling the way `bench_parallel.py`
computes them (wall: throughput over the same window; CPU: the slowest process's CPU per unit of
work). For ranks: the median wait at the all-reduce, the share of the step spent waiting, and the
CPU the other threads (gloo's) burn; for every mode, the CPU inside the oracle's coordinate
evaluation ("coordinate work") and the rest of the step. `--trace` prints every timed step;
`--pin` pins process r to CPU r in every mode (an experiment; at load 4 to 6 it did not resolve
anything). Writes nothing.
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
from local_ranks import dense_digits_cge  # noqa: E402

MODES = ("solo", "ceiling", "halves", "ranks")


def _thread_cpu_other() -> float:
    """CPU seconds of every thread of this process except the calling (main) one."""
    return time.process_time() - time.thread_time()


def _worker(rank: int, port: int, mode: str, steps: int, warmup: int, cut: int | None, start, queue,
            pin: bool = False) -> None:
    torch.set_num_threads(1)
    if pin:  # process r on CPU r (every mode alike): no two of them share a core
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    from blackbox_zo import parallel

    x, y, oracle, theta0, drift, estimator = dense_digits_cge()
    if mode == "solo" and rank == 1:  # the other core stays idle
        start.wait(timeout=600)
        queue.put((rank, None))
        return
    sharder = None
    reduce_log: list[tuple[float, float, float]] = []  # (entry wall, wall inside, CPU inside) per all-reduce
    if mode == "ranks":
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        parallel.init_from_env(None)
        sharder = parallel.PlanSharder(refine=os.environ.get("_TIMELINE_FIXED_CUT") != "1")
        inner = torch.distributed.all_reduce

        def all_reduce(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                reduce_log.append((w, time.perf_counter() - w, time.process_time() - c))

        torch.distributed.all_reduce = all_reduce
    spent = [0.0]  # CPU seconds inside the oracle's coordinate evaluation (the work itself)
    inner_coords = oracle.query_coordinates

    def query_coordinates(*args, **kwargs):
        c = time.process_time()
        try:
            return inner_coords(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - c

    oracle.query_coordinates = query_coordinates
    d = theta0.numel()
    coords = None
    if mode == "halves":
        everything = torch.arange(d)
        coords = everything[:cut] if rank == 0 else everything[cut:]
    rows = []
    for s in range(warmup + steps):
        if s == warmup:
            start.wait(timeout=600)
        batch = (x[(s % 20) * 64:(s % 20 + 1) * 64], y[(s % 20) * 64:(s % 20 + 1) * 64])
        theta = theta0 + (s + 1) * drift
        oracle.on_step(theta, batch)
        n_before = len(reduce_log)
        spent[0] = 0.0
        w0, c0, o0 = time.perf_counter(), time.process_time(), _thread_cpu_other()
        estimator.estimate(oracle, theta, batch, coords=coords, sharder=sharder)
        w1, c1, o1 = time.perf_counter(), time.process_time(), _thread_cpu_other()
        if s >= warmup:
            mine = reduce_log[n_before:]
            rows.append({"t0": w0, "wall": w1 - w0, "cpu": c1 - c0, "other_cpu": o1 - o0, "work_cpu": spent[0],
                         "reduce_entry": mine[-1][0] if mine else float("nan"),
                         "reduce_wall": sum(r[1] for r in mine), "reduce_cpu": sum(r[2] for r in mine),
                         "shard_cpu": sharder.last_shard_seconds if sharder is not None else float("nan"),
                         "bounds": list(sharder._bounds) if sharder is not None and sharder._bounds else None})
    queue.put((rank, rows))
    if mode == "ranks":
        parallel.shutdown()


def _run(mode: str, steps: int, warmup: int, cut: int | None, pin: bool = False) -> list[list[dict] | None]:
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, mode, steps, warmup, cut, start, queue, pin)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=900) for _ in procs)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():  # a rank that hangs must not outlive the benchmark
                p.kill()
    return [got[0], got[1]]


def _med(values) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(mode: str, per_rank: list[list[dict] | None], steps: int) -> dict:
    """Per-step medians and the throughput / CPU-per-work numbers bench_parallel's ratios use."""
    live = [rows for rows in per_rank if rows]
    out = {"mode": mode}
    # units of work per step: a full step for solo/ceiling processes, a half for ranks/halves
    work = 1.0 if mode in ("solo", "ceiling") else 0.5
    out["wall_ms"] = _med(r["wall"] for rows in live for r in rows) * 1e3
    out["cpu_ms"] = _med(r["cpu"] for rows in live for r in rows) * 1e3
    out["other_cpu_ms"] = _med(r["other_cpu"] for rows in live for r in rows) * 1e3
    out["work_cpu_ms"] = _med(r["work_cpu"] for rows in live for r in rows) * 1e3
    out["overhead_cpu_ms"] = _med(r["cpu"] - r["work_cpu"] for rows in live for r in rows) * 1e3
    # throughput in full steps per second over the timed window (bench_parallel: ranks by rank 0's
    # window, independent processes summed); CPU per full step of work, the slowest process
    if mode == "ranks":
        window = sum(r["wall"] for r in live[0])
        out["steps_per_s"] = steps / window
    else:
        out["steps_per_s"] = sum(steps * work / sum(r["wall"] for r in rows) for rows in live)
    out["cpu_per_full_step_ms"] = max(sum(r["cpu"] for r in rows) for rows in live) / steps / work * 1e3
    if mode == "ranks" and len(live) == 2:
        a, b = live
        out["wait_ms"] = _med(abs(ra["reduce_entry"] - rb["reduce_entry"]) for ra, rb in zip(a, b)) * 1e3
        out["reduce_wall_ms"] = _med(r["reduce_wall"] for rows in live for r in rows) * 1e3
        out["reduce_cpu_ms"] = _med(r["reduce_cpu"] for rows in live for r in rows) * 1e3
        out["shard_cpu_ms"] = [_med(r["shard_cpu"] for r in rows) * 1e3 for rows in live]
        out["late_rank"] = [sum(1 for ra, rb in zip(a, b) if (ra["reduce_entry"] > rb["reduce_entry"]) == (i == 0))
                            for i in range(2)]
        out["cut"] = a[-1]["bounds"][1] if a[-1]["bounds"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=8, help="untimed first steps (calibration and refinement)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the four modes, interleaved")
    ap.add_argument("--pin", action="store_true", help="pin process r to CPU r in every mode (an experiment)")
    ap.add_argument("--trace", action="store_true", help="print every timed step of the ranks and the ceiling")
    ap.add_argument("--fixed-cut", action="store_true",
                    help="ranks keep the calibrated cut (no per-step refinement), as bench_parallel's 'calibrated'")
    ap.add_argument("--cut", type=int, default=None,
                    help="first coordinate of the second half in 'halves' mode (default: the ranks' last cut)")
    args = ap.parse_args(argv)
    if args.fixed_cut:  # read by the spawned ranks
        os.environ["_TIMELINE_FIXED_CUT"] = "1"
    if args.steps < 1 or args.warmup < 4 or args.rounds < 1:
        ap.error("--steps >= 1, --warmup >= 4, --rounds >= 1")
    print(f"timeline_parallel: digits CNN dense CGE, batch 64, 3,818 coordinates, 1 thread each; "
          f"{args.steps} timed steps after {args.warmup}; load average {os.getloadavg()[0]:.2f} at the start")
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    cut = args.cut
    for rnd in range(args.rounds):
        for mode in ("ranks", "solo", "ceiling", "halves"):  # ranks first: halves uses their cut
            per_rank = _run(mode, args.steps, args.warmup, cut if cut is not None else 390, args.pin)
            s = summarize(mode, per_rank, args.steps)
            if args.trace and mode in ("ranks", "ceiling", "halves"):
                for i, (a, b) in enumerate(zip(*per_rank)):
                    extra = (f" entry {1e3 * (a['reduce_entry'] - b['reduce_entry']):+6.2f} ms (rank 0 - rank 1), "
                             f"shard {1e3 * a['shard_cpu']:.1f} / {1e3 * b['shard_cpu']:.1f}, cut {a['bounds'][1]}"
                             if mode == "ranks" else "")
                    print(f"    {mode} step {i}: wall {1e3 * a['wall']:.1f} / {1e3 * b['wall']:.1f}, CPU "
                          f"{1e3 * a['cpu']:.1f} / {1e3 * b['cpu']:.1f} ms{extra}")
            if mode == "ranks" and args.cut is None and s.get("cut"):
                cut = s["cut"]
            results[mode].append(s)
        ceil = results["ceiling"][-1]
        line = [f"round {rnd + 1} (load {os.getloadavg()[0]:.2f}):"]
        for mode in MODES:
            s = results[mode][-1]
            line.append(f"{mode} {s['wall_ms']:.1f}/{s['cpu_ms']:.1f} ms (x ceiling wall "
                        f"{s['steps_per_s'] / ceil['steps_per_s']:.2f}, CPU "
                        f"{ceil['cpu_per_full_step_ms'] / s['cpu_per_full_step_ms']:.2f})")
        r = results["ranks"][-1]
        line.append(f"ranks: wait at the all-reduce {r['wait_ms']:.2f} ms, all-reduce {r['reduce_wall_ms']:.2f} wall / "
                    f"{r['reduce_cpu_ms']:.2f} CPU ms, other threads {r['other_cpu_ms']:.2f} CPU ms/step, "
                    f"shards {r['shard_cpu_ms'][0]:.1f} / {r['shard_cpu_ms'][1]:.1f} CPU ms, "
                    f"late rank 0/1: {r['late_rank'][0]}/{r['late_rank'][1]} steps, cut {r['cut']}")
        print("\n  ".join(line), flush=True)
    print(f"medians over {args.rounds} rounds (per step: wall / CPU ms; ratios as bench_parallel computes them):")
    for mode in MODES:
        rs = results[mode]
        wall_x = [s["steps_per_s"] / c["steps_per_s"] for s, c in zip(rs, results["ceiling"])]
        cpu_x = [c["cpu_per_full_step_ms"] / s["cpu_per_full_step_ms"] for s, c in zip(rs, results["ceiling"])]
        print(f"  {mode:<8} step {_med(s['wall_ms'] for s in rs):6.2f} / {_med(s['cpu_ms'] for s in rs):6.2f} ms, "
              f"coordinate work {_med(s['work_cpu_ms'] for s in rs):6.2f}, "
              f"the rest {_med(s['overhead_cpu_ms'] for s in rs):5.2f}"
              f" (other threads {_med(s['other_cpu_ms'] for s in rs):4.2f}) CPU ms; CPU per full step of work "
              f"{_med(s['cpu_per_full_step_ms'] for s in rs):6.2f} ms; x ceiling wall {_med(wall_x):.3f} "
              f"[{min(wall_x):.3f}, {max(wall_x):.3f}], CPU {_med(cpu_x):.3f} [{min(cpu_x):.3f}, {max(cpu_x):.3f}]")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
