"""One timed epoch of DeepZero's ResNet-20 recipe (`blackbox-zo train cifar10`) on CIFAR-shaped synthetic data.

    .venv/bin/python benchmarks/gpu_epoch.py --device cuda                  # the paper's setting, 50K images
    .venv/bin/python benchmarks/gpu_epoch.py --device cpu --tiny            # seconds: proves the path works

The paper's settings (DeepZero Sec. 6.1 / Appx. F; problems/cifar10.py defaults): ResNet-20,
Sparse-CGE at 90% gradient sparsity from ZO-GraSP, mu 5e-3, batch 256, exact feature reuse,
one epoch over 50,000 training images. The images are synthetic (uniform random uint8 pixels,
random labels) written in CIFAR-10's own file layout, and the real `cifar10` problem reads them:
the time of a step depends on tensor shapes, the batch size and the coordinate count, never on
pixel values (no data-dependent branch in the network, the loss or the estimator), so the timing
is that of the real dataset; the accuracy is meaningless and not reported.

Printed: the setup time (reading the data, ZO-GraSP pruning), the training loop's wall time for
the epoch (the trainer's own `wall_s`), steps and coordinate queries per second, and the peak
memory (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS), and the ratio to the
paper's 60 minutes per epoch (4 x V100 at batch 512, DeepZero Appx. F). `--tiny`: 16 images,
batch 8 (2 steps), sparsity 0.9995 over all parameters (136 coordinates), pruning with q 4, a test
set of 8: the same code path in seconds on CPU.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blackbox_zo.config import resolve_config  # noqa: E402
from blackbox_zo.problem import get_problem  # noqa: E402
from blackbox_zo.trainer import train  # noqa: E402

PAPER_EPOCH_S = 60 * 60  # DeepZero Appx. F: ~60 minutes per epoch of ResNet-20 on CIFAR-10


def write_synthetic_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """CIFAR-10's python layout (data_batch_1..5, test_batch) with random pixels and labels."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, n in enumerate(sizes, start=1):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, size=n).tolist()}
        with open(d / f"data_batch_{i}", "wb") as fh:
            pickle.dump(entry, fh, protocol=4)
    entry = {"data": rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8),
             "labels": rng.integers(0, 10, size=n_test).tolist()}
    with open(d / "test_batch", "wb") as fh:
        pickle.dump(entry, fh, protocol=4)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a CPU-sized setting of the same path (seconds)")
    ap.add_argument("--train-size", type=int, default=50_000)
    ap.add_argument("--test-size", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--out", default=None, help="run directory root (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    settings = [f"run.device={args.device}", "run.epochs=1", "run.progress=false", "run.eval_every_epochs=1"]
    if args.tiny:
        args.train_size, args.test_size, args.batch = 16, 8, 8
        settings += ["sparsity.sparsity=0.9995", "sparsity.weights_only=false", "sparsity.q=4",
                     "sparsity.samples_per_class=1", "data.eval_batch_size=8"]
    if not args.device.startswith("cuda"):
        settings += ["run.threads=1"]  # small operations on a shared CPU: a second thread only synchronises
    else:
        settings += [f"sparsity.sparsity={args.sparsity}"]
    if args.train_size < args.batch or args.test_size < 1:
        ap.error("--train-size must be >= --batch and --test-size >= 1")
    with tempfile.TemporaryDirectory(prefix="gpu_epoch_") as tmp:
        root = write_synthetic_cifar10(Path(tmp) / "data", args.train_size, args.test_size)
        out = Path(args.out) if args.out else Path(tmp) / "runs"
        settings += [f"data.root={root}", f"data.batch_size={args.batch}", f"data.train_size={args.train_size}",
                     f"data.test_size={args.test_size}", f"run.out_dir={out}"]
        problem = get_problem("cifar10")
        config = resolve_config(problem.config_model, problem.default_config(), None, settings)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        run_dir = out / "cifar10" / "gpu-epoch"
        t0 = time.perf_counter()
        summary = train(problem, config, run_dir=run_dir)
        total = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak, what = torch.cuda.max_memory_allocated(), "CUDA max_memory_allocated"
        else:
            peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"
        sparsity = json.loads((run_dir / "sparsity.json").read_text()) if (run_dir / "sparsity.json").is_file() else {}
    loop_s = float(summary["wall_s"])
    coords = summary["queries"]["train"] / max(1, summary["steps"])
    result = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "train_images": args.train_size, "batch": args.batch, "sparsity": config.sparsity.sparsity,
              "steps": summary["steps"], "queries_per_step": coords, "train_queries": summary["queries"]["train"],
              "prune_queries": summary["queries"]["prune"], "setup_and_eval_s": total - loop_s, "epoch_loop_s": loop_s,
              "total_s": total, "queries_per_s": summary["queries"]["train"] / loop_s, "peak_memory_bytes": peak,
              "peak_memory_kind": what, "x_faster_than_paper_epoch": PAPER_EPOCH_S / loop_s,
              "stopped": summary["stopped"], "parameters": sparsity.get("parameters")}
    print(f"ResNet-20 Sparse-CGE epoch on {args.device}{' (' + result['gpu'] + ')' if result['gpu'] else ''}: "
          f"{args.train_size} synthetic CIFAR-shaped images, batch {args.batch}, sparsity {config.sparsity.sparsity}, "
          f"{summary['steps']} steps x {coords:.0f} coordinate queries")
    print(f"  epoch (training loop): {loop_s:.1f} s  ({result['queries_per_s']:.0f} queries/s); setup (data, ZO-GraSP "
          f"{summary['queries']['prune']} queries) and evaluation: {total - loop_s:.1f} s")
    print(f"  peak memory: {peak / 2**30:.2f} GiB ({what})")
    print(f"  vs the paper's 60 min/epoch: {result['x_faster_than_paper_epoch']:.1f}x faster (target >= 10x"
          f"{'' if not args.tiny else '; tiny setting, not comparable'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if summary["stopped"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
