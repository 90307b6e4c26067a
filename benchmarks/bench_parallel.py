"""Forward parallelism: queries/s of a CGE or RGE step, 1 rank vs M ranks, one thread each, in one run.

    .venv/bin/python benchmarks/bench_parallel.py                 # digits CNN + a CIFAR-shaped CNN, 1 vs 2 ranks
    .venv/bin/python benchmarks/bench_parallel.py --ranks 4 --models digits,resnet20 --steps 5

What is measured. Each configuration runs in fresh processes (torch.multiprocessing spawn),
each with one intra-op thread, joined by a gloo group on localhost:

* reference: plain `CGE.estimate` in one process (no process group), the single-process path;
* M independent processes: the reference in M unconnected processes at once (their timed steps
  start together, at a barrier after the warm-up, as the ranks' do). Their summed
  throughput is the most any M-rank scheme can get from this machine (cores that share caches,
  memory bandwidth or a physical core cost something even without communication);
* M ranks, even split: `CGE.estimate` with a `parallel.PlanSharder` cutting the coordinate plan into M
  pieces of equal count;
* M ranks, calibrated: the sharder cuts the pieces by the per-block cost measured on
  the first steps, kept fixed;
* M ranks, balanced (the default): calibrated, then the cut refined every step from each rank's
  measured shard time (`parallel.refine_costs`).

A step = one full forward-CGE estimate (base loss + every coordinate of the set + the
all-reduce) at a new theta and a new batch, as in training (so no cache carries over).
Warm-up steps (first-touch, the cost measurement, the first refinements) are not timed. Two ratios:

* speed-up (wall): coordinate queries per second of wall time on rank 0 (ranks are in
  lock-step through the all-reduce, so rank 0's wall time is the job's), M ranks / reference.
  This is the number that counts, on a machine with M idle cores.
* speed-up (CPU): reference CPU seconds per step / CPU seconds per step of the slowest rank.
  CPU time is what a process gets done, not how long it waited for a core, so this ratio
  stays meaningful on a busy shared machine; it leaves out time spent waiting in the
  all-reduce that is not CPU (on localhost, small).

`imbalance` is max / mean over ranks of the CPU seconds spent on their own shards.
`x ceiling` is the M-rank throughput over that of M independent processes in the same run: the
share of what this machine allows that the ranks reach (target >= 0.95). It is printed for every
method that runs under torchrun: CGE (coordinates, cut by measured cost) and RGE (`--q` seeded
directions, split evenly; its modes are reference, independent and even split).

Every mode runs `--repeats` times (default 3), interleaved, and the median is reported.
The load average is printed before and after. Results: runs/bench_parallel/<timestamp>/results.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

MU = 5e-3


# ------------------------------------------------------------------------------ models


def _digits(batch_size: int):
    from problems.digits import load_digits_split, make_digits_cnn

    x, y, _, _ = load_digits_split(0)
    torch.manual_seed(0)
    return make_digits_cnn(8), x, y


def _cifar_cnn(batch_size: int):
    """A CIFAR-shaped CNN (3x32x32 input, 3 conv + 1 linear, 64,554 parameters) on synthetic data:
    the timing does not depend on what the pixels show."""
    gen = torch.Generator().manual_seed(0)
    n = 8 * batch_size
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    return model, x, y


def _resnet20(batch_size: int):
    try:
        from problems.models import resnet20
    except ImportError as exc:
        raise SystemExit(f"bench_parallel: --models resnet20 needs problems.models.resnet20 ({exc})") from None
    gen = torch.Generator().manual_seed(0)
    n = 8 * batch_size
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    torch.manual_seed(0)
    return resnet20(), x, y


MODELS = {
    # name: (builder, batch size, coordinates per step: None = all)
    "digits": (_digits, 64, None),
    "cifar-cnn": (_cifar_cnn, 32, 1000),
    "resnet20": (_resnet20, 64, 2000),
}


def _coords(d: int, n: int | None) -> torch.Tensor | None:
    """A fixed sample of n coordinates spread uniformly over all blocks (as Sparse-CGE would)."""
    if n is None or n >= d:
        return None
    return torch.sort(torch.randperm(d, generator=torch.Generator().manual_seed(1))[:n]).values


# ------------------------------------------------------------------------------ worker


def _worker(rank: int, world: int, port: int, model_name: str, mode: str, steps: int, warmup: int, queue,
            estimator_name: str = "cge", q: int = 192, start=None) -> None:
    torch.set_num_threads(1)
    from blackbox_zo.runtime import tune_allocator

    tune_allocator()  # as a training run does (BLACKBOX_ZO_MALLOC_TUNING=0 turns it off)
    from blackbox_zo import parallel
    from blackbox_zo.estimators import CGE, RGE
    from oracles.model_loss import ModelLossOracle

    if mode not in ("reference", "independent"):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        parallel.init_from_env(None)
    build, batch_size, n_coords = MODELS[model_name]
    module, x, y = build(batch_size)
    oracle = ModelLossOracle(module)
    theta0 = oracle.initial_theta()
    coords = _coords(theta0.numel(), n_coords)
    drift = 1e-3 * torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(2))
    estimator = CGE(mu=MU) if estimator_name == "cge" else RGE(q=q, mu=MU)
    sharder = None
    if mode not in ("reference", "independent"):
        sharder = parallel.PlanSharder(balance_steps=3,  # the default
                                       balance_by_cost=(mode in ("balanced", "calibrated")),
                                       refine=(mode == "balanced"))
    n_batches = x.shape[0] // batch_size
    wall = cpu = shard = 0.0
    for step in range(warmup + steps):
        if step == warmup and start is not None:
            # every process of the configuration starts its timed steps at once: independent
            # processes that started apart would each run alone for part of their window and
            # overstate the ceiling (ranks are in lock-step anyway)
            start.wait(timeout=600)
        i = step % n_batches
        batch = (x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size])
        theta = theta0 + (step + 1) * drift  # a new point every step, as after an optimizer step
        oracle.on_step(theta, batch)
        w0, c0 = time.perf_counter(), time.process_time()
        if estimator_name == "cge":
            est = estimator.estimate(oracle, theta, batch, coords=coords, sharder=sharder)
        else:  # RGE: q seeded directions in the whole space, split evenly over the ranks
            est = estimator.estimate(oracle, theta, batch, seed=step, sharder=sharder)
        if step >= warmup:
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            shard += getattr(sharder, "last_shard_seconds", 0.0)
    queue.put({"rank": rank, "model": model_name, "ranks": world, "d": theta0.numel(),
               "coords": (theta0.numel() if coords is None else coords.numel()) if estimator_name == "cge" else q,
               "steps": steps, "estimator": estimator_name,
               "wall": wall, "cpu": cpu, "shard_cpu": shard if mode not in ("reference", "independent") else cpu,
               "queries_per_step": est.queries})


def _modes(ranks: int, estimator: str = "cge") -> list[tuple[str, int]]:
    if estimator != "cge":  # directions cost alike: one even split, no cost model
        return [("reference", 1), ("independent", ranks), ("even split", ranks)]
    return [("reference", 1), ("independent", ranks), ("even split", ranks), ("calibrated", ranks),
            ("balanced", ranks)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(model: str, mode: str, world: int, steps: int, warmup: int, estimator: str = "cge",
               q: int = 192) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Barrier(world)
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, model, mode, steps, warmup, queue, estimator, q, start))
             for r in range(world)]
    for p in procs:
        p.start()
    import queue as queue_module

    results: dict[int, dict] = {}
    try:
        while len(results) < world:
            try:
                r = queue.get(timeout=1.0)
                results[r["rank"]] = r
            except queue_module.Empty:  # a rank that crashed (even without a traceback) ends the wait
                bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
                if bad:
                    raise SystemExit(f"bench_parallel: {model}/{mode}: a rank exited with status {bad}")
                if all(not p.is_alive() for p in procs):  # all done: the results are in the pipe, or never came
                    r = queue.get(timeout=5.0)
                    results[r["rank"]] = r
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    ranks = [results[r] for r in range(world)]
    out = dict(ranks[0])
    if mode == "independent":
        # M unconnected processes, each doing the whole step: the machine's ceiling for M ranks.
        # Throughput adds up; "CPU s/step" is what the M of them spend per step of work done.
        out["coord_qps"] = sum(r["coords"] * steps / r["wall"] for r in ranks)
        out["cpu_per_step"] = max(r["cpu"] for r in ranks) / steps / world
    else:
        out["coord_qps"] = out["coords"] * steps / out["wall"]  # rank 0's wall time is the job's (lock-step)
        out["cpu_per_step"] = max(r["cpu"] for r in ranks) / steps  # the slowest rank's CPU seconds per step
    shards = [r["shard_cpu"] for r in ranks]
    out["imbalance"] = max(shards) / (sum(shards) / len(shards)) if sum(shards) > 0 else float("nan")
    return out


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the parallel runs (default 2)")
    ap.add_argument("--models", default="digits,cifar-cnn", help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--estimators", default="cge,rge", help="comma-separated: cge, rge (the methods torchrun runs)")
    ap.add_argument("--q", type=int, default=192, help="RGE directions per step")
    # 20 timed steps after 12: with 4 after 4 (the former default) one step's jitter on this kind of VM
    # (20 to 30 ms for the same digits half-step) decided the ranking of the cuts (docs/performance.md)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=12,
                    help="untimed first steps (>= 4: the first 3 measure block costs, the rest refine the cut)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all modes; the median round is reported")
    ap.add_argument("--out", default="runs/bench_parallel")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r}; known: {', '.join(MODELS)}")
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    if not estimators or set(estimators) - {"cge", "rge"}:
        ap.error(f"--estimators: allowed cge, rge; got {args.estimators!r}")
    if args.q < 1:
        ap.error(f"--q must be >= 1, got {args.q}")
    if args.ranks < 2:
        ap.error(f"--ranks must be >= 2, got {args.ranks}")
    if args.steps < 1 or args.warmup < 4:
        ap.error("--steps must be >= 1 and --warmup >= 4")

    tuning = "off (BLACKBOX_ZO_MALLOC_TUNING=0)" if os.environ.get("BLACKBOX_ZO_MALLOC_TUNING", "1") == "0" else "on"
    print(f"bench_parallel: torch {torch.__version__}, one thread per rank, forward CGE, mu={MU}, malloc tuning {tuning}")
    before = _load()
    print(f"before: {before}")
    rows = []
    cases = [(m, e) for m in models for e in estimators]
    every: dict[tuple[str, str], dict[str, list[dict]]] = {}  # all repeats, for the per-round ratios
    for model, est in cases:
        runs: dict[str, list[dict]] = every.setdefault((model, est), {})
        for rep in range(args.repeats):  # modes interleaved, so a change of load hits all of them
            for mode, world in _modes(args.ranks, est):
                r = run_config(model, mode.split()[0], world, args.steps, args.warmup, est, args.q)
                runs.setdefault(mode, []).append(r)
                print(f"  {model:<10} {est:<4} {mode:<11} ranks={world}  {r['coord_qps']:9.0f} queries/s (wall)  "
                      f"{r['cpu_per_step']:.3f} CPU s/step (slowest rank)  imbalance {r['imbalance']:.2f}", flush=True)
        for mode, _ in _modes(args.ranks, est):  # the median repeat, by throughput
            r = sorted(runs[mode], key=lambda x: x["coord_qps"])[(len(runs[mode]) - 1) // 2]
            r["mode"] = mode
            rows.append(r)
    after = _load()
    print(f"after:  {after}")

    def pick(model: str, est: str, mode: str) -> dict:
        return next(r for r in rows if r["model"] == model and r["estimator"] == est and r["mode"] == mode)

    header = ["model", "estimator", "parameters", "queries/step", "mode", "ranks", "queries/s (wall)",
              "speed-up (wall)", "x ceiling (wall)", "CPU s/step, slowest rank", "speed-up (CPU)", "x ceiling (CPU)",
              "imbalance"]
    table = []
    for model, est in cases:
        ref, ceiling = pick(model, est, "reference"), pick(model, est, "independent")
        for r in (x for x in rows if x["model"] == model and x["estimator"] == est):
            table.append([model, est, r["d"], r["coords"], r["mode"], r["ranks"], round(r["coord_qps"], 1),
                          round(r["coord_qps"] / ref["coord_qps"], 2), round(r["coord_qps"] / ceiling["coord_qps"], 3),
                          round(r["cpu_per_step"], 4), round(ref["cpu_per_step"] / r["cpu_per_step"], 2),
                          round(ceiling["cpu_per_step"] / r["cpu_per_step"], 3), round(r["imbalance"], 3)])
    out = Path(args.out) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *table])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    (out / "results.md").write_text("\n".join(md) + f"\n\nbefore: {before}\nafter: {after}\n")
    print("\n".join(md))
    # The target: M ranks >= 95% of M independent processes, in the same run, for every
    # method that runs under torchrun. "x ceiling" = (M-rank speed-up) / (M-process speed-up).
    for model, est in cases:
        ref, ceiling = pick(model, est, "reference"), pick(model, est, "independent")
        best = pick(model, est, "balanced" if est == "cge" else "even split")
        ratio = best["coord_qps"] / ceiling["coord_qps"]
        print(f"{model} {est} ({best['mode']}): {args.ranks} ranks / 1 rank = {best['coord_qps'] / ref['coord_qps']:.2f}x "
              f"wall; {args.ranks} independent processes (the machine's ceiling) = "
              f"{ceiling['coord_qps'] / ref['coord_qps']:.2f}x; ratio to the ceiling {ratio:.2f} wall, "
              f"{ceiling['cpu_per_step'] / best['cpu_per_step']:.2f} CPU (target >= 0.95: "
              f"{'met' if ratio >= 0.95 else 'missed'})")
        # each round against the ceiling measured in that same round: the spread the machine puts on one ratio
        rounds = every[(model, est)]
        paired = [b["coord_qps"] / c["coord_qps"] for b, c in zip(rounds[best["mode"]], rounds["independent"])]
        print(f"  per round (each against its own round's ceiling, wall): {', '.join(f'{x:.2f}' for x in paired)}")
    print(f"written: {out}/results.md, results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
