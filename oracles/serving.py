"""Serve ONNX models over the Open Inference Protocol (v2) with MLServer, as a subprocess.

`OipServer` writes an MLServer model repository (settings.json, one folder per model with
its model-settings.json), starts ``python -m mlserver.cli.main start`` on 127.0.0.1 in its
own process group, waits until the server and every model report ready, and stops the
whole group (SIGTERM, then SIGKILL) on `stop()` or when the `with` block ends, also on an
exception. `blackbox-zo serve-onnx MODEL.onnx` uses it in the foreground; the tests and the
throughput benchmark use it as a fixture. Needs the `serve` extra (mlserver).

The served model is `oracles.oip_runtime.OnnxRuntimeModel`: the ONNX file through ONNX
Runtime (FP32 in, the first output out), with the input and output names, datatypes and
shapes of the ONNX graph declared in model-settings.json, so the v2 metadata endpoint
tells a client what the model takes (`RemoteClassifier` checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from blackbox_zo.config import ConfigError
from blackbox_zo.interrupts import Interrupted, raise_on_signals

__all__ = ["ServedModel", "OipServer", "ServerStartError", "free_port", "onnx_signature", "write_model_repository",
           "serve_onnx"]

RUNTIME = "oracles.oip_runtime.OnnxRuntimeModel"


class ServerStartError(RuntimeError):
    """The server did not become ready (the message ends with the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def onnx_signature(path: str | Path) -> dict[str, Any]:
    """{"inputs": [...], "outputs": [...]} of an ONNX file as v2 tensor metadata (dynamic axes -> -1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def meta(arg) -> dict[str, Any]:
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
        if arg.type != "tensor(float)":
            raise ValueError(f"{path}: {arg.name} is {arg.type}; only float32 (tensor(float)) models are served")
        return {"name": arg.name, "datatype": "FP32", "shape": shape}

    return {"inputs": [meta(session.get_inputs()[0])], "outputs": [meta(session.get_outputs()[0])]}


@dataclass
class ServedModel:
    """One model of the repository: `name` (and `version`) in the v2 URL, the ONNX file it serves."""

    name: str
    onnx: Path
    version: str | None = None
    threads: int = 1
    implementation: str = RUNTIME
    extra: dict[str, Any] = field(default_factory=dict)  # more parameters.extra for the runtime

    def settings(self) -> dict[str, Any]:
        onnx = Path(self.onnx).resolve()
        if not onnx.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.onnx}")
        params: dict[str, Any] = {"uri": str(onnx), "extra": {"threads": int(self.threads), **self.extra}}
        if self.version is not None:
            params["version"] = str(self.version)
        return {"name": self.name, "implementation": self.implementation, "parameters": params,
                **onnx_signature(onnx)}


def write_model_repository(directory: Path, models: Sequence[ServedModel], *, host: str, http_port: int,
                           grpc_port: int) -> Path:
    """settings.json + <name>/model-settings.json under `directory` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": host,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_endpoint": None,  # no metrics server (it would need a third port)
        "parallel_workers": 0,  # inference in the server process: no worker pool to start or feed by IPC
        "load_models_at_startup": True,
    }
    (directory / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    for model in models:
        folder = directory / (model.name if model.version is None else f"{model.name}-{model.version}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model-settings.json").write_text(json.dumps(model.settings(), indent=2) + "\n")
    return directory


class OipServer:
    """MLServer serving `models` on http://host:port, started and stopped by this object.

    ``with OipServer(models, directory=tmp) as server: ... server.url ...``; `kill()` stops it
    hard (SIGKILL, for fault tests) and `start()` starts it again on the same ports.
    `env` adds environment variables (e.g. PYTHONPATH for a runtime of your own).
    """

    def __init__(self, models: Sequence[ServedModel], directory: Path, *, host: str = "127.0.0.1",
                 http_port: int | None = None, grpc_port: int | None = None, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 120.0):
        if not models:
            raise ValueError("OipServer needs at least one model")
        self.models = list(models)
        self.directory = Path(directory)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.env = dict(env or {})
        self.startup_timeout_s = float(startup_timeout_s)
        self.process: subprocess.Popen | None = None
        self.log_path = self.directory / "mlserver.log"
        write_model_repository(self.directory, self.models, host=host, http_port=self.http_port,
                               grpc_port=self.grpc_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def model_url(self, name: str, version: str | None = None) -> str:
        return f"{self.url}/v2/models/{name}" + (f"/versions/{version}" if version is not None else "")

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> "OipServer":
        if self.running:
            return self
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlserver.cli.main", "start", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=str(self.directory), start_new_session=True)  # its own group: stop() ends every child
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2.0) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        paths = ["/v2/health/ready"] + [
            f"/v2/models/{m.name}" + (f"/versions/{m.version}" if m.version is not None else "") + "/ready"
            for m in self.models]
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerStartError(f"MLServer exited with code {self.process.returncode if self.process else '?'} "
                                       f"before it was ready; log {self.log_path}:\n{self.log_tail()}")
            if all(self._get(p) == 200 for p in paths):
                return
            time.sleep(0.2)
        raise ServerStartError(f"MLServer not ready on {self.url} after {self.startup_timeout_s:.0f} s; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and its children at once (a crash, for fault tests)."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout_s`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # children that outlived the parent
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel owes us this one
            pass

    def __enter__(self) -> "OipServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_onnx(args: argparse.Namespace) -> int:
    """`blackbox-zo serve-onnx` (oracles/serve_command.py parses the arguments): serve until Ctrl-C or SIGTERM."""
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
