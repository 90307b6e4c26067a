"""Throughput of RemoteClassifier against a real MLServer (Open Inference Protocol v2, REST, JSON).

Same server, same model (the digits CNN, 3,818 parameters, 1x8x8 images), same run:

* one image per request, one request at a time (a naive client);
* `--max-batch` images per request, one request at a time;
* `--max-batch` images per request, `--in-flight` requests at once (the default client);

and the in-process ONNX Runtime session as the ceiling. Prints images/s and the ratios
against the one-at-a-time references. The numbers depend on the machine and its load; the
ratios are what to compare.

    python benchmarks/bench_remote.py [--images 20000] [--max-batch 512] [--in-flight 4] [--repeats 3]
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


def _rate(classify, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    rates, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = classify(x)
        rates.append(x.shape[0] / (time.perf_counter() - t))
    return statistics.median(rates), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20_000, help="images per batched measurement")
    p.add_argument("--single-images", type=int, default=300, help="images for the one-image-per-request client")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--server-threads", type=int, default=1, help="ONNX Runtime threads per request in the server")
    p.add_argument("--repeats", type=int, default=3, help="median of this many timings per client")
    args = p.parse_args(argv)

    from oracles.classifier import OnnxClassifier, export_onnx
    from oracles.remote import RemoteClassifier
    from oracles.serving import OipServer, ServedModel
    from problems.digits import make_digits_cnn

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 1, 8, 8, generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(make_digits_cnn(8), Path(tmp) / "digits.onnx", (1, 8, 8))
        local = OnnxClassifier(onnx)
        with OipServer([ServedModel("digits", onnx, threads=args.server_threads)], Path(tmp) / "repo") as server:
            url = server.model_url("digits")
            clients = {
                "1 image/request, 1 in flight": RemoteClassifier(url, max_batch=1, in_flight=1),
                f"{args.max_batch} images/request, 1 in flight": RemoteClassifier(url, max_batch=args.max_batch,
                                                                                  in_flight=1),
                f"{args.max_batch} images/request, {args.in_flight} in flight": RemoteClassifier(
                    url, max_batch=args.max_batch, in_flight=args.in_flight),
            }
            ref_scores = local(x)
            rates = {}
            for name, client in clients.items():
                data = x[: args.single_images] if client.max_batch == 1 else x
                client(data[:8])  # warm-up: connection, first session run
                rates[name], out = _rate(client, data, args.repeats)
                assert torch.equal(out, ref_scores[: data.shape[0]]), f"{name}: scores differ from in-process ONNX"
                client.close()
            rates["in-process ONNX Runtime session (ceiling)"], _ = _rate(local, x, args.repeats)
    names = list(rates)
    single, batched, flight = rates[names[0]], rates[names[1]], rates[names[2]]
    print(f"RemoteClassifier throughput, digits CNN, {args.images:,} images (1-image client: "
          f"{args.single_images}), median of {args.repeats}; scores bitwise equal to the in-process session")
    for name, rate in rates.items():
        print(f"  {name:<48} {rate:>12,.0f} images/s")
    print(f"ratio: {args.max_batch} images/request, {args.in_flight} in flight vs one request at a time "
          f"({args.max_batch} images): {flight / batched:.2f}x")
    print(f"ratio: {args.max_batch} images/request, {args.in_flight} in flight vs 1 image per request, one at a "
          f"time: {flight / single:.1f}x")
    print(f"ratio: in-process session vs the best remote client: {rates[names[3]] / flight:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
