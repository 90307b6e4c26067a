"""Coordinate queries per second of CGE: naive loop vs batched vmap path vs exact feature reuse.

    python benchmarks/bench_cge.py                    # digits CNN (all coordinates) + ResNet-20 (2,000)
    python benchmarks/bench_cge.py --threads 2 --models digits
    python benchmarks/bench_cge.py --resnet-coords 500 --budget-s 5

Paths, all computing losses at theta + mu e_j for a set of coordinates j on one batch:
  naive      perturb one weight in place, full forward, restore (what DeepZero's code does,
             minus its per-query state_dict copies, so a fast version of it)
  vmap       the default batched path: Oracle.coordinate_losses -> ModelLossOracle.losses
             (perturbed parameter vectors in chunks, torch.func.vmap over the forward)
  stage      feature reuse at block granularity (DeepZero eq. (4): re-run the stages after
             the perturbed one, no linearity), blackbox_zo.reuse granularity="stage"
  reuse      exact feature reuse with the rank-one / one-channel linearity (the default)

Population rows (`--population P`, default 28: an ES / sep-CMA-ES step): full forwards of P
perturbed models on one batch, loss values per CPU second:
  pop-loop   load each member's parameters into the module, plain forward (the reference)
  pop-vmap   ModelLossOracle.losses through torch.func.vmap (population=False)
  pop-group  ModelLossOracle.losses through blackbox_zo.population (grouped convolutions,
             batched matrix products; the default for an nn.Sequential)
  pop-tail1  the same, members perturbed in every layer but the first conv (it is the same in
             all: computed once per batch, the next conv is one dense conv on the shared input)
  pop-fc     the same, members perturbed in the linear layer only (the whole conv stack runs
             once per batch: ES / sep-CMA-ES on the last layer, digits' model.frozen_convs=2)
interleaved in the same way, with the largest difference of the losses against the loop of the
same members (a loop costs the same whichever layers differ, so "x loop" is against pop-loop).

Rates are per CPU second of this (one-thread) process, so other jobs on a shared machine
distort them less than wall time; the wall-clock ratio is printed beside. The reuse rows
time the whole coordinate set and include the step's unperturbed forward
(the cache is cleared first). The naive and vmap paths cost the same for every coordinate
(a full forward each), so they are timed on a random subset for --budget-s seconds. The
machine is shared, so the paths are interleaved: slices of naive / vmap time between the
reuse repeats (digits) or pieces (ResNet-20), so that all see the same load on average. Ratios are measured in this run on this machine; the matmul rate (CPU time, same
thread count) is measured here too, and "brute-force equivalent" = queries/s x FLOPs of one full forward / matmul FLOP/s:
how fast one would have to multiply matrices to get the same rate by running the full
forward per query. The FLOPs each path executes per query (convolutions and matrix
products, torch.utils.flop_counter, on a subsample) show the arithmetic saved, independent
of the machine's load. Results go to runs/bench_cge/<time>/ as Markdown and CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blackbox_zo.reuse import FeatureReuse  # noqa: E402
from oracles.model_loss import ModelLossOracle  # noqa: E402

MU = 5e-3


# ----------------------------------------------------------------------------- inputs


def digits_case(batch: int, seed: int):
    from problems.digits import load_digits_split, make_digits_cnn

    torch.manual_seed(seed)
    module = make_digits_cnn()
    x, y, _, _ = load_digits_split(0)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:batch]
    return module, x[idx], y[idx]


def resnet_case(batch: int, seed: int):
    from problems.models import resnet20

    torch.manual_seed(seed)
    module = resnet20()
    gen = torch.Generator().manual_seed(seed)
    return module, torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def spread_sample(space, n: int, seed: int) -> torch.Tensor:
    """n coordinates, at least one in every parameter block, the rest drawn uniformly over all
    coordinates (so each layer gets its share of a full CGE), sorted."""
    gen = torch.Generator().manual_seed(seed)
    must = torch.stack([b.offset + torch.randint(0, b.numel, (1,), generator=gen)[0] for b in space])
    rest = torch.randperm(space.dim, generator=gen)
    rest = rest[~torch.isin(rest, must)][: max(0, n - must.numel())]
    return torch.sort(torch.cat([must, rest])[:n]).values


# ------------------------------------------------------------------------------ paths


def naive_losses(module: nn.Module, loss_fn, x, y, coords: torch.Tensor, mu: float) -> torch.Tensor:
    """Perturb one weight in place, full forward, restore (running statistics restored too)."""
    params = dict(module.named_parameters())
    space = ModelLossOracle(module, feature_reuse=False).space
    flats = [params[b.name].data.view(-1) for b in space]
    where = space.block_index(coords).tolist()
    bufs = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in bufs]
    out = []
    with torch.no_grad():
        for j, bi in zip(coords.tolist(), where):
            flat, k = flats[bi], j - space.blocks[bi].offset
            old = flat[k].item()
            flat[k] = old + mu
            out.append(loss_fn(module(x), y).item())
            flat[k] = old
            for b, s in zip(bufs, saved):
                b.copy_(s)
    return torch.tensor(out)


DEVICE = torch.device("cpu")


def clock() -> float:
    """CPU seconds of this process on CPU; on a GPU, wall seconds after the queued kernels finish."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        return time.perf_counter()
    return time.process_time()


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    if DEVICE.type == "cuda":
        n = 8192  # enough work to fill the GPU
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    a @ b
    times = []
    for _ in range(repeats):
        t = clock()
        a @ b
        times.append(clock() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def memory_bandwidth_gbs(mib: int = 64, repeats: int = 5) -> float:
    """Bytes per CPU-second of a copy between two buffers larger than the last-level cache
    (read + write: 2 x the buffer per copy), one thread, median of `repeats`."""
    if DEVICE.type == "cuda":
        mib = 1024  # far beyond the L2 cache
    src = torch.ones(mib * 2**20 // 4, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = clock()
        dst.copy_(src)
        times.append(clock() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


class TrafficCounter(TorchDispatchMode):
    """Bytes every aten operation reads and writes (its tensor inputs and outputs), as if none stayed
    in a cache: the memory traffic a path must move at most, per operation it runs. Views move
    nothing and are skipped; an in-place operation counts its inputs once."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        aliased = [r.alias_info for r in returns if r.alias_info is not None]
        if aliased and not any(a.is_write for a in aliased):
            return out  # a view
        leaves = tree_leaves((args, kwargs or {})) + ([] if aliased else tree_leaves(out))
        self.bytes += sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                          for t in leaves if isinstance(t, torch.Tensor))
        return out


def forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------- main


def run_case(name: str, module, x, y, coords, args, peak_gflops: float, *, stage: bool, repeats: int,
             piece: int | None) -> list[dict]:
    """Time all paths interleaved: the reuse paths run the coordinate set in pieces, and before
    each piece the naive and vmap paths get an equal slice of their time budget, so every path
    sees the same machine load on average (the CPU is shared; sequential timing was biased)."""
    from tqdm.auto import tqdm

    loss_fn = nn.functional.cross_entropy
    module.train()
    module, x, y = module.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    batch = (x, y)
    flops = forward_flops(module, x)
    oracle = ModelLossOracle(module, feature_reuse=False)
    theta = oracle.initial_theta()
    n = coords.numel()
    perm = coords[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    print(f"{name}: d = {oracle.space.dim}, batch {x.shape[0]}, {n} coordinates, forward {flops / 1e6:.1f} MFLOP",
          flush=True)

    engines = {path: FeatureReuse(module, oracle.space, loss_fn, granularity=gran,
                                  memory_cap_bytes=args.memory_cap_mb * 2**20)
               for path, gran in (("stage", "stage"), ("reuse", "layer")) if path == "reuse" or stage}
    for engine in engines.values():
        engine.coordinate_losses(theta, coords[:8], MU, batch)  # warm-up: trace caches, first-chunk sizing
    t = time.perf_counter()
    naive_losses(module, loss_fn, x, y, perm[:1], MU)  # warm-up, and: is a forward expensive?
    expensive = time.perf_counter() - t > 0.05
    # vmap per call: its own chunk for a cheap model (per-call overhead matters), small pieces for an
    # expensive one (so that it fits the time slices; its cost is then all compute)
    vmap_step = args.naive_step if expensive else oracle._vmap_chunk(theta, x)
    naive_out, vmap_out = [], []
    done = {"naive": 0, "vmap": 0, **{p: 0 for p in engines}}
    spent = {p: 0.0 for p in done}  # wall seconds
    cpu = {p: 0.0 for p in done}  # CPU seconds of this process: the work, less sensitive to other load
    results = {p: torch.empty(n) for p in engines}
    pieces = torch.split(torch.arange(n), piece or n)
    slots = repeats * len(pieces)
    slice_s = args.budget_s / slots

    def run_slice(path, fn, step, outs):
        start = time.perf_counter()
        while done[path] < n and (time.perf_counter() - start < slice_s or done[path] == 0):
            k = min(step, n - done[path])
            t0, c0 = time.perf_counter(), clock()
            outs.append(fn(perm[done[path]:done[path] + k]).cpu())
            spent[path] += time.perf_counter() - t0
            cpu[path] += clock() - c0
            done[path] += k

    with tqdm(total=slots, desc=name, leave=False, disable=None) as bar:
        for _ in range(repeats):
            for engine in engines.values():
                engine._state = None  # each repeat includes the step's unperturbed forward
            for piece in pieces:
                run_slice("naive", lambda c: naive_losses(module, loss_fn, x, y, c, MU), args.naive_step, naive_out)
                run_slice("vmap", lambda c: oracle.coordinate_losses(theta, c, MU, batch), vmap_step, vmap_out)
                for path, engine in engines.items():
                    t0, c0 = time.perf_counter(), clock()
                    results[path][piece] = engine.coordinate_losses(theta, coords[piece], MU, batch).cpu()
                    spent[path] += time.perf_counter() - t0
                    cpu[path] += clock() - c0
                    done[path] += piece.numel()
                bar.update(1)
    naive_ref, reference = torch.cat(naive_out), torch.cat(vmap_out)

    # FLOPs per query, counted (load-independent): what the reuse paths save in arithmetic
    from torch.utils.flop_counter import FlopCounterMode

    flops_per_query = {"naive": flops, "vmap": flops}
    counted = coords[:: max(1, n // 200)]
    for path, engine in engines.items():
        engine._state = None
        with FlopCounterMode(display=False) as counter:
            engine.coordinate_losses(theta, counted, MU, batch)
        flops_per_query[path] = (counter.get_total_flops() - flops) / counted.numel()  # less the base forward

    # bytes moved per query (load-independent): a full forward for naive / vmap; for the reuse paths the
    # coordinate evaluations alone, after the step's unperturbed forward (as the FLOPs above)
    with torch.no_grad(), TrafficCounter() as traffic:
        loss_fn(module(x), y)
    bytes_per_query = {"naive": traffic.bytes, "vmap": traffic.bytes}
    for path, engine in engines.items():
        engine._state = None
        engine.prepare(theta, batch)
        with TrafficCounter() as traffic:
            engine.coordinate_losses(theta, counted, MU, batch)
        bytes_per_query[path] = traffic.bytes / counted.numel()

    rows = []
    pos = {int(c): i for i, c in enumerate(coords.tolist())}
    idx = torch.tensor([pos[int(c)] for c in perm.tolist()])
    for path in ("naive", "vmap", *engines):
        rate = done[path] / cpu[path]
        note = "subset" if path in ("naive", "vmap") and done[path] < n else ""
        if path in engines:
            r = results[path]
            rel = float(((r[idx[: reference.numel()]] - reference) / reference.abs()).abs().max())
            rel_naive = float(((r[idx[: naive_ref.numel()]] - naive_ref) / naive_ref.abs()).abs().max())
            note = f"max rel. diff vs vmap {rel:.1e}, vs naive {rel_naive:.1e}"
        rows.append({"model": name, "path": path, "coords_timed": done[path], "cpu_s": round(cpu[path], 3),
                     "wall_s": round(spent[path], 3), "queries_per_s": rate, "queries_per_wall_s": done[path] / spent[path],
                     "brute_force_equiv_pct": 100 * rate * flops / (peak_gflops * 1e9),
                     "flops_per_query": flops_per_query[path], "bytes_per_query": bytes_per_query[path],
                     "note": note})
        print(f"  {path:6s} {done[path]:6d} coords in {cpu[path]:7.2f} CPU s ({spent[path]:7.2f} wall)  ->  "
              f"{rate:10.1f} queries/CPU-s  {note}", flush=True)
    for r in rows:
        r["x_naive"] = r["queries_per_s"] / rows[0]["queries_per_s"]
        r["x_naive_wall"] = r["queries_per_wall_s"] / rows[0]["queries_per_wall_s"]
        r["x_fewer_flops"] = flops / max(1.0, r["flops_per_query"])
    return rows


def loop_population_losses(module: nn.Module, space, loss_fn, x, y, thetas: torch.Tensor) -> torch.Tensor:
    """The reference: each member's parameters loaded into the module, one plain forward each."""
    params = dict(module.named_parameters())
    saved = {k: v.detach().clone() for k, v in params.items()}
    out = []
    with torch.no_grad():
        try:
            for theta in thetas:
                for name, view in space.views(theta).items():
                    params[name].copy_(view)
                out.append(loss_fn(module(x), y))
        finally:
            for k, v in saved.items():
                params[k].copy_(v)
    return torch.stack(out)


def run_population(name: str, module, x, y, size: int, budget_s: float, seed: int) -> list[dict]:
    """Queries per CPU second of a population of `size` full forwards: loop vs vmap vs grouped (interleaved),
    and grouped with the members equal in a prefix of layers (perturbed on a suffix only)."""
    loss_fn = nn.functional.cross_entropy
    module.train()
    grouped = ModelLossOracle(module, feature_reuse=False, population=True)
    vmapped = ModelLossOracle(module, feature_reuse=False, population=False)
    space = grouped.space
    theta = grouped.initial_theta()
    gen = torch.Generator().manual_seed(seed)
    thetas = theta + 0.02 * torch.randn(size, theta.numel(), generator=gen)

    def suffix_only(first_perturbed: str) -> torch.Tensor:
        """Members that equal theta before block `first_perturbed` (perturbed from it on)."""
        start = space[first_perturbed].offset
        out = thetas.clone()
        out[:, :start] = theta[:start]
        return out

    convs = [n for n in space.names if n.endswith(".weight") and len(space[n].shape) == 4]
    linear = [n for n in space.names if n.endswith(".weight") and len(space[n].shape) == 2]
    members = {"pop-loop": thetas, "pop-vmap": thetas, "pop-group": thetas}
    if len(convs) >= 2:
        members["pop-tail1"] = suffix_only(convs[1])
    if linear:
        members["pop-fc"] = suffix_only(linear[-1])
    batch = (x, y)
    paths = {"pop-loop": lambda: loop_population_losses(module, space, loss_fn, x, y, thetas),
             "pop-vmap": lambda: vmapped.losses(thetas, batch)}
    for p in members:
        if p.startswith("pop-") and p not in paths:
            # a fresh batch tensor each call, as each step has its own: the population forward keeps a shared
            # prefix's output for the next call on the same batch, which would time a step's second chunk
            paths[p] = (lambda m: lambda: grouped.losses(m, (x.clone(), y)))(members[p])
    outs = {p: fn() for p, fn in paths.items()}  # warm-up, and the values compared
    refs = {p: outs["pop-loop"] if members[p] is thetas else
            loop_population_losses(module, space, loss_fn, x, y, members[p]) for p in paths}
    cpu = {p: 0.0 for p in paths}
    wall = {p: 0.0 for p in paths}
    calls = {p: 0 for p in paths}
    deadline = time.perf_counter() + 3 * budget_s
    while time.perf_counter() < deadline or min(calls.values()) < 3:
        for p, fn in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[p] += time.perf_counter() - t0
            cpu[p] += time.process_time() - c0
            calls[p] += 1
    rows = []
    for p in paths:
        rate = calls[p] * size / cpu[p]
        diff = float(((outs[p] - refs[p]) / refs[p].abs()).abs().max())
        rows.append({"model": name, "path": p, "population": size, "calls": calls[p], "cpu_s": round(cpu[p], 3),
                     "queries_per_s": rate, "queries_per_wall_s": calls[p] * size / wall[p],
                     "note": f"max rel. diff vs loop {diff:.1e}"})
        print(f"  {p:9s} {calls[p]:4d} calls of {size} in {cpu[p]:7.2f} CPU s -> {rate:10.1f} queries/CPU-s  "
              f"(max rel. diff vs loop {diff:.1e})", flush=True)
    for r in rows:
        r["x_naive"] = r["queries_per_s"] / rows[0]["queries_per_s"]
        r["x_naive_wall"] = r["queries_per_wall_s"] / rows[0]["queries_per_wall_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on a GPU, rates are per wall second "
                   "after synchronisation instead of per CPU second")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the CPU is shared; CPU seconds add up over threads)")
    p.add_argument("--models", default="digits,resnet20", help="comma-separated: digits, resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resnet-coords", type=int, default=2000, help="fixed coordinate sample for ResNet-20")
    p.add_argument("--budget-s", type=float, default=12.0,
                   help="seconds each of naive / vmap may run per model (spread over the run)")
    p.add_argument("--naive-step", type=int, default=4)
    p.add_argument("--repeats", type=int, default=8, help="timed repeats of the digits reuse paths")
    p.add_argument("--resnet-repeats", type=int, default=1, help="timed repeats of the ResNet-20 reuse paths")
    p.add_argument("--piece", type=int, default=500,
                   help="ResNet-20: coordinates per call of the reuse paths (progress, interleaving)")
    p.add_argument("--memory-cap-mb", type=int, default=256)
    p.add_argument("--no-stage", dest="stage", action="store_false", help="skip the block-granularity row on digits")
    p.add_argument("--resnet-stage", action="store_true",
                   help="also time block-granularity reuse on ResNet-20 (slow: several minutes on one core)")
    p.add_argument("--population", type=int, default=28,
                   help="members of the population rows (an ES step); 0: no population rows")
    p.add_argument("--population-widths", default="8",
                   help="digits CNN widths of the population rows, comma-separated (8: d = 3,818; 32: d = 29,066)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_cge")
    args = p.parse_args(argv)
    for field_name in ("threads", "batch", "resnet_coords", "repeats", "resnet_repeats", "naive_step", "memory_cap_mb", "piece"):
        if getattr(args, field_name) < 1:
            p.error(f"--{field_name.replace('_', '-')} must be >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"digits", "resnet20"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; allowed: digits, resnet20")
    torch.set_num_threads(args.threads)
    global DEVICE
    try:
        DEVICE = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if DEVICE.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    from blackbox_zo.runtime import tune_allocator

    malloc = "tuned" if tune_allocator() else "glibc defaults"  # as training runs (BLACKBOX_ZO_MALLOC_TUNING=0: off)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peak = matmul_gflops()
    bandwidth = memory_bandwidth_gbs()
    print(f"device {DEVICE}, threads {args.threads}, malloc {malloc}, load average {load:.2f}, matmul 1024^3 fp32: {peak:.1f} GFLOP/s, "
          f"memory bandwidth (copy of 64 MiB): {bandwidth:.1f} GB/s", flush=True)
    rows: list[dict] = []
    if "digits" in models:
        module, x, y = digits_case(args.batch, args.seed)
        coords = torch.arange(ModelLossOracle(module, feature_reuse=False).space.dim)
        rows += run_case("digits-cnn", module, x, y, coords, args, peak, stage=args.stage, repeats=args.repeats,
                         piece=None)
    if "resnet20" in models:
        module, x, y = resnet_case(args.batch, args.seed)
        space = ModelLossOracle(module, feature_reuse=False).space
        coords = spread_sample(space, min(args.resnet_coords, space.dim), args.seed)
        rows += run_case("resnet20", module, x, y, coords, args, peak, stage=args.resnet_stage,
                         repeats=args.resnet_repeats, piece=args.piece)
    pop_rows: list[dict] = []
    if args.population > 0 and "digits" in models:
        from problems.digits import make_digits_cnn

        for width in [int(w) for w in args.population_widths.split(",") if w.strip()]:
            _, x, y = digits_case(args.batch, args.seed)
            torch.manual_seed(args.seed)
            module = make_digits_cnn(width)
            d = sum(p.numel() for p in module.parameters())
            print(f"population of {args.population}: digits CNN width {width} (d = {d}), batch {x.shape[0]}", flush=True)
            pop_rows += run_population(f"digits-w{width}", module, x, y, args.population, args.budget_s / 3, args.seed)
    peak_after = matmul_gflops()
    bandwidth_after = memory_bandwidth_gbs()

    lines = [f"threads {args.threads}; load average {load:.2f} at start; matmul {peak:.1f} GFLOP/s "
             f"(again at the end: {peak_after:.1f}); batch {args.batch}; mu {MU}", "",
             "| model | path | coords timed | queries per CPU-s | x naive | (wall: x naive) | "
             "brute-force equiv. (% of matmul) | conv/matmul FLOPs per query (x fewer) | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['path']} | {r['coords_timed']} | {r['queries_per_s']:.1f} | "
                     f"{r['x_naive']:.1f} | {r['x_naive_wall']:.1f} | {r['brute_force_equiv_pct']:.1f} | "
                     f"{r['flops_per_query'] / 1e6:.2f} M ({r['x_fewer_flops']:.1f}x) | {r['note']} |")
    targets = {"digits-cnn": 100.0, "resnet20": 10.0}  # the speed targets (docs/performance.md)
    for name, target in targets.items():
        got = [r for r in rows if r["model"] == name and r["path"] == "reuse"]
        if got:
            x_naive = got[0]["x_naive"]
            lines.append(f"\n{name}: reuse = {x_naive:.1f}x naive (target >= {target:.0f}x: "
                         f"{'met' if x_naive >= target else f'missed by {target / x_naive:.2f}x'})")
    got = [r for r in rows if r["model"] == "digits-cnn" and r["path"] == "reuse"]
    if got:
        pct = got[0]["brute_force_equiv_pct"]
        lines.append(f"digits-cnn: brute-force equivalent {pct:.0f}% of matmul peak (target >= 100%: "
                     f"{'met' if pct >= 100 else 'missed'})")
    if pop_rows:
        lines += ["", f"Population forward: {args.population} perturbed models on one batch of {args.batch} (an ES / "
                  "sep-CMA-ES step), loss values per CPU second", "",
                  "| model | path | queries per CPU-s | x loop | (wall: x loop) | note |", "|---|---|---:|---:|---:|---|"]
        for r in pop_rows:
            lines.append(f"| {r['model']} | {r['path']} | {r['queries_per_s']:.1f} | {r['x_naive']:.2f} | "
                         f"{r['x_naive_wall']:.2f} | {r['note']} |")
        reuse = [r for r in rows if r["model"] == "digits-cnn" and r["path"] == "reuse"]
        if reuse:  # the reuse rows are the width-8 CNN on the same batch
            lines.append(f"\ndigits CNN width 8, batch {args.batch}, this run: a population query costs this many "
                         f"feature-reuse coordinate queries ({reuse[0]['queries_per_s']:.0f}/CPU-s):")
            for r in pop_rows:
                if r["model"] == "digits-w8" and r["path"] != "pop-loop":
                    r["x_reuse_cost"] = reuse[0]["queries_per_s"] / r["queries_per_s"]
                    lines.append(f"  {r['path']:9s} {r['queries_per_s']:8.0f}/CPU-s ({r['x_naive']:.2f}x loop): "
                                 f"{r['x_reuse_cost']:.1f}x a reuse query")
    # Roofline: a query must do its FLOPs and move its bytes; each alone caps the rate at
    # (machine rate) / (per-query amount). The lower cap is the limit; achieved / limit is the
    # distance to it. Machine rates: the better of the two measurements of this run.
    flop_rate, byte_rate = max(peak, peak_after) * 1e9, max(bandwidth, bandwidth_after) * 1e9
    lines += ["", f"Roofline (one thread; matmul {max(peak, peak_after):.1f} GFLOP/s, memory bandwidth "
              f"{max(bandwidth, bandwidth_after):.1f} GB/s, both measured in this run): a query's conv/matmul FLOPs "
              "and the bytes its operations read and write (none assumed cached) each cap the queries per CPU-s.", "",
              "| model | path | FLOPs per query | bytes per query | FLOP/byte | FLOP cap (q/s) | bandwidth cap (q/s) | "
              "bound | achieved (q/CPU-s) | achieved / cap |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        f_cap = flop_rate / max(1.0, r["flops_per_query"])
        b_cap = byte_rate / max(1.0, r["bytes_per_query"])
        cap = min(f_cap, b_cap)
        r.update(flop_cap_qps=f_cap, bandwidth_cap_qps=b_cap, x_roofline=r["queries_per_s"] / cap)
        lines.append(f"| {r['model']} | {r['path']} | {r['flops_per_query'] / 1e6:.3f} M | "
                     f"{r['bytes_per_query'] / 2**20:.3f} MiB | {r['flops_per_query'] / max(1.0, r['bytes_per_query']):.2f} | "
                     f"{f_cap:.0f} | {b_cap:.0f} | {'compute' if f_cap < b_cap else 'memory'} | "
                     f"{r['queries_per_s']:.1f} | {r['x_roofline']:.3f} |")
    text = "\n".join(lines)
    print("\n" + text)
    out_dir = Path(args.out) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_cge.md").write_text(text + "\n")
    with open(out_dir / "bench_cge.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows + pop_rows for k in r)))
        w.writeheader()
        w.writerows(rows + pop_rows)
    print(f"\nwritten: {out_dir}/bench_cge.md, bench_cge.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
