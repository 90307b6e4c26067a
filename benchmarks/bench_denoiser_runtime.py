"""Certification throughput of our DnCNN denoiser: eager torch vs ONNX Runtime prefix + torch last layer.

    python benchmarks/bench_denoiser_runtime.py                 # the experiment's default denoiser
    python benchmarks/bench_denoiser_runtime.py --width 16 --threads 2

CERTIFY (Cohen et al.) spends almost all of its time denoising N noisy copies of each test
image, so `problems/certified_defense/experiment.py` runs the frozen DnCNN prefix on ONNX
Runtime (one export shared by the MSE, FO and ZO denoisers, which differ only in their last
layer) and the last convolution in torch. This prints images/s of both paths on the same
batch in this run and their ratio, plus the largest output difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oracles.classifier import OnnxFunction, export_onnx  # noqa: E402
from oracles.smoothing import DnCNN  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=10_000, help="images per call (CERTIFY's sample batch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    den = DnCNN(channels=1, depth=args.depth, width=args.width).eval()
    with torch.no_grad():
        den.last.weight.normal_(0, 0.05)
    x = torch.rand(args.batch, 1, 8, 8)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = OnnxFunction(export_onnx(den.prefix, Path(tmp) / "prefix.onnx", (1, 8, 8), names=("noisy", "features")),
                              threads=args.threads)

        def eager():
            with torch.no_grad():
                return den(x)

        def onnx_prefix():
            with torch.no_grad():
                return den.head(x, prefix(x))

        gap = float((eager() - onnx_prefix()).abs().max())
        t_eager, m_eager = best_of(eager, args.repeats)
        t_onnx, m_onnx = best_of(onnx_prefix, args.repeats)
    print(f"DnCNN depth {args.depth} width {args.width}, {args.batch} images of 1x8x8, {args.threads} thread(s)")
    print(f"  eager torch          {args.batch / t_eager:10.0f} images/s (best of {args.repeats}; median {args.batch / m_eager:.0f})")
    print(f"  onnx prefix + torch  {args.batch / t_onnx:10.0f} images/s (best of {args.repeats}; median {args.batch / m_onnx:.0f})")
    print(f"  ratio onnx/eager     {t_eager / t_onnx:10.2f}x   max |difference| {gap:.2e}")


if __name__ == "__main__":
    main()
