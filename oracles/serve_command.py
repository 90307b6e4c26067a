"""`blackbox-zo serve-onnx MODEL.onnx`: serve an ONNX classifier over the Open Inference Protocol (v2).

Starts MLServer (the `serve` extra) in the foreground with `oracles.oip_runtime.OnnxRuntimeModel`,
prints the model's v2 URL (what `classifier.source` takes), and stops the server on Ctrl-C.
Registered through the entry-point group blackbox_zo.commands; imports nothing heavy.
"""

from __future__ import annotations

import argparse

__all__ = ["ServeOnnxCommand"]


class ServeOnnxCommand:
    help = "serve an ONNX classifier over the Open Inference Protocol v2 (MLServer), for classifier.source"
    description = ("Serve MODEL.onnx with MLServer on HOST:PORT until Ctrl-C. The model's URL, "
                   "http://HOST:PORT/v2/models/NAME, is what `--set classifier.source=...` takes. Needs the serve "
                   "extra: pip install 'blackbox-zo[serve]'.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="an ONNX file: one FP32 input [batch, C, H, W], scores [batch, classes] out")
        p.add_argument("--name", help="model name in the URL (default: the file's stem)")
        p.add_argument("--version", help="model version in the URL (optional)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
        p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: a free one)")
        p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per request (default 1)")
        p.add_argument("--dir", help="where to write the MLServer model repository (default: a temporary folder)")

    def run(self, args: argparse.Namespace) -> int:
        from .serving import serve_onnx

        return serve_onnx(args)
