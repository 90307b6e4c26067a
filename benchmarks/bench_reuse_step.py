"""One feature-reuse CGE step, this tree's blackbox_zo/reuse.py vs the same file at another git revision.

    .venv/bin/python benchmarks/bench_reuse_step.py --against main          # digits training step
    .venv/bin/python benchmarks/bench_reuse_step.py --against 3895ab4 --models digits,resnet20

Both engines run in this process, on the same module, batches and coordinates, alternating step
by step (so both see the same machine load), one thread, CPU seconds of this process. A step is
what the trainer runs: the unperturbed forward (`prepare`, with the running-statistics update
when the model has batch norm), the base loss, and `coordinate_losses` over the step's
coordinates, at a new theta and batch every step. The losses of the two engines must be
bitwise equal (torch.equal), step by step: a speed-up that changes a bit does not count.

* digits: the default `blackbox-zo train digits` step (batch 16, the 412 Sparse-CGE coordinates
  ZO-GraSP picks at 90% sparsity);
* digits-dense: dense CGE on the digits CNN, batch 64, all 3,818 coordinates (the step that
  `bench_cge.py --models digits` and `bench_parallel.py --models digits` time);
* resnet20: ResNet-20, CIFAR-shaped synthetic batch of 64 (time does not depend on pixel values),
  `--resnet-coords` coordinates spread over every block.

The old file is read with `git show REV:blackbox_zo/reuse.py` and imported as a sibling module,
so it must still run against this tree's `blackbox_zo.oracle` (true back to the first reuse.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_reuse import digits_case, digits_dense_case, resnet_case  # noqa: E402

MU = 5e-3


def load_reuse_at(rev: str):
    """blackbox_zo/reuse.py as of git revision `rev`, imported as blackbox_zo._reuse_at_rev."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:blackbox_zo/reuse.py"], check=True,
                             capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench_reuse_step: --against {rev!r}: {exc.stderr.strip()}") from None
    path = Path(tempfile.mkdtemp(prefix="reuse_at_rev_")) / "reuse.py"
    path.write_text(src)
    name = "blackbox_zo._reuse_at_rev"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_model(name: str, oracle, coords, batches, old_cls, steps: int, warmup: int) -> dict:
    from blackbox_zo.reuse import FeatureReuse

    module, space, loss_fn = oracle.module, oracle.space, oracle.loss_fn
    engines = {"old": old_cls(module, space, loss_fn), "new": FeatureReuse(module, space, loss_fn)}
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())
    theta0 = oracle.initial_theta()
    drift = 1e-4 * torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(1))
    # running statistics are updated by the step's first prepare; give each engine the same buffers
    buffers = {k: v.clone() for k, v in module.state_dict().items() if not k.endswith(("weight", "bias"))}
    cpu = {"old": [], "new": []}
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        theta = theta0 + (i + 1) * drift
        out = {}
        for label in (("old", "new") if i % 2 == 0 else ("new", "old")):
            engine = engines[label]
            module.load_state_dict(buffers, strict=False)
            c = time.process_time()
            engine.prepare(theta, batch, update_running_stats=has_bn)
            base = engine.base_loss(theta, batch)
            losses = engine.coordinate_losses(theta, coords, MU, batch)
            if i >= warmup:
                cpu[label].append(time.process_time() - c)
            out[label] = (base, losses)
        if not (torch.equal(out["old"][0], out["new"][0]) and torch.equal(out["old"][1], out["new"][1])):
            diff = float((out["old"][1] - out["new"][1]).abs().max())
            raise SystemExit(f"bench_reuse_step: {name}: step {i}: the two engines' losses differ (max {diff:.3g}); "
                             "not bitwise equal")
    old, new = statistics.median(cpu["old"]), statistics.median(cpu["new"])
    ratios = [o / n for o, n in zip(cpu["old"], cpu["new"])]
    return {"model": name, "coords": coords.numel(), "old_ms": old * 1e3, "new_ms": new * 1e3,
            "speedup": old / new, "ratio_median": statistics.median(ratios), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="main", help="git revision of the reference reuse.py (default main)")
    ap.add_argument("--models", default="digits", help="comma-separated: digits, digits-dense, resnet20")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per engine (digits)")
    ap.add_argument("--resnet-steps", type=int, default=3)
    ap.add_argument("--resnet-coords", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=4)
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = {"digits", "digits-dense", "resnet20"}
    if set(models) - known:
        ap.error(f"--models: unknown {sorted(set(models) - known)}; allowed: {', '.join(sorted(known))}")
    if min(args.steps, args.resnet_steps, args.resnet_coords) < 1 or args.warmup < 0:
        ap.error("--steps, --resnet-steps, --resnet-coords must be >= 1, --warmup >= 0")
    torch.set_num_threads(1)
    from blackbox_zo.runtime import tune_allocator

    tune_allocator()
    old = load_reuse_at(args.against)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "blackbox_zo/reuse.py"],
                           capture_output=True, text=True).stdout.strip()
    print(f"reuse step: this tree ({head}{' + uncommitted reuse.py' if dirty else ''}) vs {args.against}; "
          "1 thread, CPU ms per step (median), alternating steps, losses bitwise equal")
    rows = []
    for name in models:
        if name == "digits":
            oracle, coords, batches = digits_case(0)
            rows.append(run_model("digits", oracle, coords, batches, old.FeatureReuse, args.steps, args.warmup))
        elif name == "digits-dense":
            oracle, coords, batches = digits_dense_case(0, 64)
            rows.append(run_model("digits-dense", oracle, coords, batches, old.FeatureReuse, args.steps, args.warmup))
        else:
            oracle, coords, batches = resnet_case(0, args.resnet_coords, 64)
            rows.append(run_model("resnet20", oracle, coords, batches, old.FeatureReuse, args.resnet_steps,
                                  min(args.warmup, 1)))
        r = rows[-1]
        print(f"  {r['model']:<12} {r['coords']:5d} coords  {args.against}: {r['old_ms']:8.2f} ms   this tree: "
              f"{r['new_ms']:8.2f} ms   speed-up {r['speedup']:.2f}x (median of per-step ratios "
              f"{r['ratio_median']:.2f}x, {r['steps']} steps each)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
