"""Shared by the tests that talk to a real Open Inference Protocol server (MLServer, the serve extra)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FAULTY = "oip_fault_runtime.FaultyOnnxModel"
SECRET = "s3cret-token-4711"  # the bearer token of the "auth" model

# A tiny certified-defense pipeline: seconds per stage, two steps of 38 loss queries.
TINY = [
    "defense.classifier_width=4", "defense.classifier_epochs=2", "defense.denoiser_depth=3",
    "defense.denoiser_width=4", "defense.pretrain_epochs=1", "defense.eval_noise_draws=1",
    "run.epochs=1", "run.max_steps=2", "run.progress=false", "data.batch_size=16",
]


def need_serve_extra() -> None:
    """Skip (with the reason) where the serve extra is not installed; `make test` installs it."""
    for module in ("mlserver", "httpx", "onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(module, reason=f"needs the serve extra ({module} missing): pip install 'blackbox-zo[serve]'")


def server_env() -> dict[str, str]:
    """The test server imports the fault runtime from tests/."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(TESTS) + (os.pathsep + path if path else "")}
