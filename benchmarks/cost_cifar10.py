"""What one step (and the full run) of the cifar10 recipe costs: measured here, extrapolated beyond.

    python benchmarks/cost_cifar10.py                  # batch 256, 300 of the step's coordinates
    python benchmarks/cost_cifar10.py --sample 1000 --threads 2

A step of DeepZero's recipe estimates the coordinates of the sparse set (90% of the conv /
linear weights left out, batch-norm parameters and the fc bias always in) plus one base
query. This script draws such a set (uniform layer-wise ratios: the same count as ZO-GraSP's,
which only moves coordinates between layers), times the feature-reuse path on a random
sample of it at the recipe's batch size on random CIFAR-shaped data, and counts the FLOPs
the reuse path executes (torch.utils.flop_counter). Printed: queries per step, measured
queries/s and seconds per step on this machine, the whole run's CPU time, and an
EXTRAPOLATION of GPU time = measured FLOPs per step / an assumed sustained GPU rate (not a
measurement: no GPU here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blackbox_zo.sparsity import DynamicSparseSampler, prunable_mask, uniform_ratios  # noqa: E402
from oracles.model_loss import ModelLossOracle  # noqa: E402
from problems.models import resnet20  # noqa: E402

STEPS_PER_EPOCH = 50_000 // 256


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched: on a GPU, roughly one kernel launch each."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))
EPOCHS = 50


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sample", type=int, default=300, help="coordinates of the step's set that are timed")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-cap-mb", type=int, default=256, help="reuse memory cap for the timed (CPU) pass")
    p.add_argument("--gpu-memory-cap-mb", type=int, default=4096,
                   help="memory cap for the counting pass (the cifar10 problem's default on CUDA)")
    p.add_argument("--gpu-tflops", type=float, nargs="+", default=[5.0, 20.0],
                   help="assumed sustained fp32 TFLOP/s of a GPU on these layer shapes, for the extrapolation")
    p.add_argument("--launch-us", type=float, default=10.0,
                   help="assumed cost of one eager operation on a GPU (launch + dispatch), microseconds")
    args = p.parse_args(argv)
    if args.batch < 1 or args.sample < 1 or not 0 <= args.sparsity < 1 or args.threads < 1:
        p.error("--batch, --sample, --threads must be >= 1 and --sparsity in [0, 1)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = resnet20().train()
    oracle = ModelLossOracle(module, memory_cap_bytes=args.memory_cap_mb * 2**20)
    space = oracle.space
    ratios = uniform_ratios(space, args.sparsity, prunable_mask(space, weights_only=True))
    step_coords = DynamicSparseSampler(space, ratios, seed=0).coords(0)
    per_step = step_coords.numel() + 1
    gen = torch.Generator().manual_seed(0)
    sample = torch.sort(step_coords[torch.randperm(step_coords.numel(), generator=gen)[: args.sample]]).values
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    theta = oracle.initial_theta()
    load = os.getloadavg()[0]
    print(f"threads {args.threads}, load average {load:.2f}; batch {args.batch}; "
          f"{per_step} queries per step ({step_coords.numel()} coordinates + 1 base)", flush=True)

    t = time.perf_counter()
    oracle.on_step(theta, (x, y))  # the step's unperturbed forward (also serves the base query)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    oracle.coordinate_losses(theta, sample, 5e-3, (x, y))
    coord_s = time.perf_counter() - t
    rate = sample.numel() / coord_s
    step_s = base_s + (per_step - 1) / rate

    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs and operations of the reuse path, block by block (a script: a loop over the 65 blocks is
    # fine), with the GPU's memory cap. Per query FLOPs depend on the block only; operations are per
    # chunk, and a full step has ceil(k_b / chunk_b) chunks in block b.
    gpu_oracle = ModelLossOracle(module, memory_cap_bytes=args.gpu_memory_cap_mb * 2**20)
    engine = gpu_oracle.reuse
    gpu_oracle.on_step(theta, (x, y))
    blocks = space.block_index(step_coords)
    step_flops_coords, step_ops = 0.0, 0.0
    for bi in torch.unique(blocks).tolist():
        in_block = step_coords[blocks == bi]
        probe = in_block[:2]
        ops = _OpCounter()
        with FlopCounterMode(display=False) as counter, ops:
            gpu_oracle.coordinate_losses(theta, probe, 5e-3, (x, y))
        chunk = engine._chunk_size(bi, engine.entries[bi])
        step_flops_coords += counter.get_total_flops() / probe.numel() * in_block.numel()
        step_ops += ops.count * -(-in_block.numel() // chunk)
    flops_per_query = step_flops_coords / step_coords.numel()
    ops_per_query = step_ops / step_coords.numel()
    with FlopCounterMode(display=False) as counter:
        module(x)
    forward_flops = counter.get_total_flops()
    step_flops = forward_flops + (per_step - 1) * flops_per_query
    total_steps = STEPS_PER_EPOCH * EPOCHS

    lines = [
        f"measured on this CPU: base forward {base_s:.2f} s; {sample.numel()} coordinates in {coord_s:.1f} s "
        f"= {rate:.2f} queries/s",
        f"  one step: {step_s / 60:.1f} min; the full run ({EPOCHS} epochs x {STEPS_PER_EPOCH} steps = {total_steps}): "
        f"{step_s * total_steps / 86400:.0f} CPU-days at this rate",
        f"FLOPs (counted): full forward {forward_flops / 1e9:.1f} GFLOP; reuse path {flops_per_query / 1e9:.2f} GFLOP "
        f"per coordinate query ({forward_flops / flops_per_query:.1f}x less); one step {step_flops / 1e12:.1f} TFLOP; "
        f"full run {step_flops * total_steps / 1e15:.0f} PFLOP",
    ]
    launch_s = step_ops * args.launch_us * 1e-6
    lines.append(f"operations (counted per chunk, chunks from a {args.gpu_memory_cap_mb} MiB cap): {step_ops:.0f} per "
                 f"step, {ops_per_query:.1f} per coordinate query")
    for tf in args.gpu_tflops:
        s = step_flops / (tf * 1e12) + launch_s
        lines.append(f"  EXTRAPOLATION, not measured: at a sustained {tf:g} TFLOP/s plus {args.launch_us:g} us per "
                     f"operation a step takes {s:.1f} s ({launch_s:.1f} s of it launches), "
                     f"the full run {s * total_steps / 3600:.0f} GPU-hours")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
