"""`blackbox-zo serve-onnx MODEL.onnx`: serve an ONNX classifier over the Open Inference Protocol (v2).

Starts MLServer (the `serve` extra) in the foreground with `oracles.oip_runtime.OnnxRuntimeModel`,
prints the model's v2 URL (what `classifier.source` takes), and stops the server on Ctrl-C.
Registered through the entry-point group blackbox_zo.commands; imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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
        from blackbox_zo.config import ConfigError
        from blackbox_zo.interrupts import Interrupted, raise_on_signals

        model = Path(args.model)
        if not model.is_file() or model.suffix != ".onnx":
            raise ConfigError(f"serve-onnx: {model} is not an .onnx file")
        if not 1 <= args.port <= 65535:
            raise ConfigError(f"--port must be in 1..65535, got {args.port}")
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        try:
            import mlserver  # noqa: F401
        except ImportError as exc:
            raise ImportError("serve-onnx needs MLServer: pip install 'blackbox-zo[serve]'") from exc
        from .serving import OipServer, ServedModel

        name = args.name or model.stem
        directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="blackbox-zo-serve-"))
        try:
            server = OipServer([ServedModel(name, model, version=args.version, threads=args.threads)], directory,
                               host=args.host, http_port=args.port, grpc_port=args.grpc_port)
        except ValueError as exc:
            raise ConfigError(f"serve-onnx: {exc}") from None
        # SIGTERM as well as Ctrl-C ends the `with` block, which stops MLServer's whole process group
        with raise_on_signals(), server:
            print(f"serving {model} at {server.model_url(name, args.version)} (log: {server.log_path}); "
                  "Ctrl-C stops it", flush=True)
            try:
                while server.running:
                    time.sleep(0.5)
            except Interrupted:
                print("stopping the server", file=sys.stderr)
                return 0
        print(f"blackbox-zo: error: the server exited with code {server.process.returncode}; log {server.log_path}",
              file=sys.stderr)
        return 1
