"""Query-only image classifiers: images in, class scores out, nothing else, every image counted.

The black-box defense (DeepZero Sec. 6.2, Appx. G) treats the classifier f as an API
owned by someone else. `BlackBoxClassifier` is that API; two adapters implement it:

* `TorchClassifier` - a torch module evaluated under `torch.no_grad()` (for tests and the
  white-box reference);
* `OnnxClassifier` - an ONNX Runtime session loaded from a `.onnx` file: the real
  gradient-free case, no autograd anywhere (optional extra: onnxruntime; exporting from
  torch with `export_onnx` needs onnx and onnxscript).

Both accept numpy arrays or torch tensors of shape [N, *input_shape], return a float32
torch tensor [N, C] of logits or probabilities (`outputs` says which), add N to
`queries` (images sent) and 1 to `calls` (requests) on every call. `OnnxFunction` is the
uncounted session wrapper we use for our own models (the denoiser at certification time).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BlackBoxClassifier",
    "TorchClassifier",
    "OnnxClassifier",
    "OnnxFunction",
    "export_onnx",
    "log_probabilities",
    "predict_labels",
]

Outputs = Literal["logits", "probabilities"]


@runtime_checkable
class BlackBoxClassifier(Protocol):
    """What the owner of a classifier shares: scores for images, and nothing else."""

    outputs: Outputs  # what __call__ returns: "logits" or "probabilities"
    queries: int  # images sent so far
    calls: int  # requests made so far (one per __call__, however large)

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        """[N, *input_shape] images -> [N, C] float32 scores (no autograd graph)."""
        ...


def _as_float32_tensor(images: Tensor | np.ndarray) -> Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    return images.detach().to(torch.float32)


class _CountingClassifier:
    """Counts images (`queries`) and requests (`calls`); evaluates in chunks of `max_batch`."""

    outputs: Outputs = "logits"

    def __init__(self, outputs: Outputs, max_batch: int):
        if outputs not in ("logits", "probabilities"):
            raise ValueError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.outputs = outputs
        self.max_batch = int(max_batch)
        self.queries = 0
        self.calls = 0

    def reset_queries(self) -> int:
        """Zero the image and request counters; returns the image count it had."""
        n, self.queries, self.calls = self.queries, 0, 0
        return n

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        x = _as_float32_tensor(images)
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"images must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
        self.queries += int(x.shape[0])
        self.calls += 1
        # Fixed-size chunks bound the memory a huge certification batch needs.
        return torch.cat([self._scores(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)])

    def _scores(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TorchClassifier(_CountingClassifier):
    """A torch module behind the black-box API: eval mode, no_grad, counted."""

    def __init__(self, module: nn.Module, outputs: Outputs = "logits", max_batch: int = 8192):
        super().__init__(outputs, max_batch)
        self.module = module.eval()

    def _scores(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.module(x).to(torch.float32)


class OnnxFunction:
    """An ONNX Runtime session as a tensor function [N, ...] -> [N, ...] (first input, first output).

    Not counted: this is how *we* run our own models (e.g. the denoiser at certification
    time) on ONNX Runtime, which is several times faster than eager torch for small convs on
    a CPU. `threads` sets onnxruntime's intra-op threads (1 by default: the machines this
    runs on are shared).
    """

    def __init__(self, path: str | Path, threads: int = 1, max_batch: int = 8192):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # optional extra
            raise ImportError("ONNX models need onnxruntime (pip install 'blackbox-zo[onnx]')") from exc
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        self.path = path
        self.max_batch = int(max_batch)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().to(torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        x = _as_float32_tensor(images)
        return torch.cat([self.run(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)])


class OnnxClassifier(_CountingClassifier):
    """An ONNX Runtime session from a `.onnx` file: the gradient-free black box, counted."""

    def __init__(self, path: str | Path, outputs: Outputs = "logits", max_batch: int = 8192, threads: int = 1):
        super().__init__(outputs, max_batch)
        self.function = OnnxFunction(path, threads=threads, max_batch=max_batch)
        self.path = self.function.path

    def _scores(self, x: Tensor) -> Tensor:
        return self.function.run(x)


def export_onnx(
    module: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    opset: int = 18,
    names: tuple[str, str] = ("images", "scores"),
) -> Path:
    """Export `module` ([N, *input_shape] -> [N, ...]) to one self-contained `.onnx` file, atomically.

    Uses torch's `torch.export`-based exporter (needs onnx and onnxscript; the TorchScript
    exporter is deprecated) with a dynamic batch axis, weights inside the file. The file
    appears only once it is complete (temp file + os.replace).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.onnx")
    was_training = module.training
    module.eval()
    example = torch.zeros(2, *input_shape)
    # The exporter logs one line per torchvision op it cannot register; irrelevant here.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=[names[0]],
                output_names=[names[1]],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        os.replace(tmp, path)
    finally:
        registration_log.setLevel(level)
        module.train(was_training)
        for leftover in path.parent.glob(f".{path.stem}.tmp{os.getpid()}*"):
            leftover.unlink()
    return path


def log_probabilities(classifier: BlackBoxClassifier, images: Tensor | np.ndarray) -> Tensor:
    """log p(c | x) from whatever the classifier returns (logits: log-softmax; probabilities: log, clamped)."""
    scores = classifier(images)
    if classifier.outputs == "logits":
        return torch.log_softmax(scores, dim=-1)
    return torch.log(scores.clamp_min(1e-12))


def predict_labels(classifier: BlackBoxClassifier, images: Tensor | np.ndarray) -> Tensor:
    """argmax class (same for logits and probabilities)."""
    return classifier(images).argmax(dim=-1)
