"""Where the time of a feature-reuse CGE step goes: per block and operation, kernel calls, allocations.

    .venv/bin/python benchmarks/profile_reuse.py                         # the digits training step
    .venv/bin/python benchmarks/profile_reuse.py --model resnet20 --coords 500 --steps 3
    .venv/bin/python benchmarks/profile_reuse.py --model digits-dense      # bench_cge / bench_parallel's step

The step is what the trainer runs (blackbox_zo/trainer.py `_zo_step`): `on_step` (the unperturbed
forward, cached), the base query, then `coordinate_losses` over the step's coordinate set, at a new
theta and a new batch every step (so no cache carries over):

* digits: the default recipe (`blackbox-zo train digits`): batch 16, the 412 coordinates
  Sparse-CGE picks after ZO-GraSP at 90% sparsity;
* digits-dense: dense CGE on the digits CNN, batch 64 (`--batch`), all 3,818 coordinates: the step
  `bench_cge.py --models digits` and `bench_parallel.py --models digits` time;
* resnet20: ResNet-20 on a CIFAR-shaped synthetic batch of 64 (timing does not depend on the
  pixel values), `--coords` coordinates spread over all 65 blocks as in benchmarks/bench_cge.py.

Three views, one thread, CPU seconds of this process (the machine is shared):

1. CPU ms per step (median), nothing instrumented;
2. per block and operation (`FeatureReuse.timings`): the perturbation's entry (rank-one update),
   every downstream operation, by the form of its input (one-channel or dense), and the loss;
   "other" is what `coordinate_losses` spends outside them (grouping coordinates by block,
   chunking, scattering results);
3. torch.profiler (wall time, as the profiler measures): aten operator calls per step (each one
   is at least one kernel launch and one trip through the dispatcher), their self time, tensor
   allocations per step, and the share of the profiled step that is not inside any operator
   (Python, the dispatcher, the profiler itself: an upper bound on the interpreter's share).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MU = 5e-3


def digits_case(seed: int):
    from blackbox_zo.config import resolve_config
    from problems.digits import DigitsProblem

    problem = DigitsProblem()
    config = resolve_config(problem.config_model, problem.default_config(), None, [f"run.seed={seed}"])
    torch.manual_seed(seed)
    setup = problem.setup(config)  # ZO-GraSP pruning at init, as `blackbox-zo train digits` does
    batches = [setup.train_batches.batch(0, i) for i in range(setup.train_batches.num_batches(0))]
    return setup.oracle, setup.coord_sampler.coords(0), batches


def digits_dense_case(seed: int, batch: int):
    from oracles.model_loss import ModelLossOracle
    from problems.digits import load_digits_split, make_digits_cnn

    x, y, _, _ = load_digits_split(0)
    torch.manual_seed(seed)
    oracle = ModelLossOracle(make_digits_cnn(8))
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(x.shape[0] // batch)]
    return oracle, torch.arange(oracle.space.dim), batches


def resnet_case(seed: int, n_coords: int, batch: int):
    from oracles.model_loss import ModelLossOracle
    from problems.models import resnet20

    torch.manual_seed(seed)
    oracle = ModelLossOracle(resnet20())
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(2)]
    space = oracle.space
    must = torch.stack([b.offset + torch.randint(0, b.numel, (1,), generator=gen)[0] for b in space])
    rest = torch.randperm(space.dim, generator=gen)
    rest = rest[~torch.isin(rest, must)][: max(0, n_coords - must.numel())]
    coords = torch.sort(torch.cat([must, rest])[:n_coords]).values
    return oracle, coords, batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["digits", "digits-dense", "resnet20"], default="digits")
    ap.add_argument("--coords", type=int, default=500, help="resnet20: coordinates per step")
    ap.add_argument("--batch", type=int, default=64, help="resnet20, digits-dense: batch size")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per view (resnet20: use a few)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="rows of the operator table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.coords < 1 or args.batch < 1:
        ap.error("--steps, --coords and --batch must be >= 1")
    torch.set_num_threads(1)
    from blackbox_zo.runtime import tune_allocator

    tune_allocator()
    if args.model == "digits":
        oracle, coords, batches = digits_case(args.seed)
    elif args.model == "digits-dense":
        oracle, coords, batches = digits_dense_case(args.seed, args.batch)
    else:
        oracle, coords, batches = resnet_case(args.seed, args.coords, args.batch)
    reuse = oracle.reuse
    theta0 = oracle.initial_theta()
    drift = 1e-4 * torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(1))
    counter = iter(range(10**9))

    def step() -> None:
        i = next(counter)
        batch = batches[i % len(batches)]
        theta = theta0 + (i + 1) * drift
        oracle.on_step(theta, batch)
        oracle.losses(theta.unsqueeze(0), batch)
        reuse.coordinate_losses(theta, coords, MU, batch)

    for _ in range(args.warmup):
        step()
    print(f"{args.model}: d = {theta0.numel()}, {coords.numel()} coordinates per step, batch "
          f"{batches[0][0].shape[0]}, torch {torch.__version__}, 1 thread")

    # 1. plain
    times = []
    for _ in range(args.steps):
        c = time.process_time()
        step()
        times.append(time.process_time() - c)
    per_step = statistics.median(times)
    print(f"\n1. CPU per step (median of {args.steps}): {per_step * 1e3:.2f} ms")

    # 2. per block and operation
    reuse.timings = {}
    c = time.process_time()
    for _ in range(args.steps):
        step()
    instrumented = (time.process_time() - c) / args.steps
    tm, reuse.timings = reuse.timings, None
    total = tm.pop(("(all blocks)", "coordinate_losses total"))
    base = tm.pop(("(all blocks)", "base forward or cache check"))
    inside = sum(tm.values())
    outside_cl = instrumented * args.steps - total  # on_step, the base query, the benchmark loop
    rows = sorted(tm.items(), key=lambda kv: -kv[1])
    print(f"\n2. per block and operation (instrumented: {instrumented * 1e3:.2f} ms per step; % of that)")
    print(f"   {'block':<28} {'operation':<34} {'ms/step':>8} {'%':>6}")
    for (block, op), s in rows:
        if s / args.steps >= 0.01e-3 or len(rows) < 30:
            print(f"   {block:<28} {op:<34} {s / args.steps * 1e3:8.3f} {100 * s / args.steps / instrumented:6.1f}")
    by_op: dict[str, float] = {}
    for (_, op), s in tm.items():
        by_op[op] = by_op.get(op, 0.0) + s
    print("   -- summed over blocks --")
    for op, s in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"   {'':<28} {op:<34} {s / args.steps * 1e3:8.3f} {100 * s / args.steps / instrumented:6.1f}")
    for label, s in (("base forward (on_step)", outside_cl), ("cache check in coordinate_losses", base),
                     ("other (grouping, chunking, scatter)", total - base - inside)):
        print(f"   {'':<28} {label:<34} {s / args.steps * 1e3:8.3f} {100 * s / args.steps / instrumented:6.1f}")

    # 3. operators
    from torch.profiler import ProfilerActivity, profile

    steps = max(1, min(args.steps, 20))
    c = time.perf_counter()  # the profiler times operators in wall seconds: so is the step here
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    profiled = (time.perf_counter() - c) / steps
    events = prof.key_averages()
    top_level = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    leaf_self = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6 / steps
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    allocs = sum(e.count for e in events if e.key in ("aten::empty", "aten::empty_strided", "aten::empty_like"))
    print(f"\n3. torch.profiler over {steps} steps ({profiled * 1e3:.2f} ms wall per profiled step)")
    print(f"   aten operator calls per step: {calls / steps:.0f} ({len(top_level) / steps:.0f} called from Python)")
    if leaf_self <= profiled:
        print(f"   their self time per step: {leaf_self * 1e3:.2f} ms = {100 * leaf_self / profiled:.0f}% of the profiled "
              f"step; the rest ({100 * (1 - leaf_self / profiled):.0f}%) is Python, dispatch and profiler overhead")
    else:  # seen on ResNet-20 under heavy load: the profiler's operator clocks then overlap; no share
        print(f"   their self time per step: {leaf_self * 1e3:.2f} ms, more than the step's wall time: the profiler's "
              "operator times are not reliable here, no Python share computed")
    print(f"   tensor allocations (aten::empty*) per step: {allocs / steps:.0f}")
    print(f"\n   {'operator':<32} {'calls/step':>10} {'self ms/step':>13} {'us/call':>9}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"   {e.key:<32} {e.count / steps:10.1f} {e.self_cpu_time_total / 1e3 / steps:13.3f} "
              f"{e.self_cpu_time_total / max(1, e.count):9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
