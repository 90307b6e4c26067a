"""An MLServer runtime that serves an ONNX model through ONNX Runtime (Open Inference Protocol v2).

Imported by the MLServer process only (`implementation` in model-settings.json), so it may
import mlserver at module level; nothing in the training process imports this module.
`oracles.serving` writes the model folder and starts the server.

One input tensor in, the model's first output out, both FP32. The ONNX Runtime call runs in
a worker thread (ONNX Runtime releases the GIL), so several requests in flight are
evaluated concurrently instead of one after the other on the event loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

__all__ = ["OnnxRuntimeModel"]


class OnnxRuntimeModel(MLModel):
    """`parameters.uri`: the .onnx file; `parameters.extra.threads`: ONNX Runtime intra-op threads."""

    async def load(self) -> bool:
        import onnxruntime as ort

        uri = await get_model_uri(self._settings)
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("threads", 1))
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(uri, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_meta = self.session.get_inputs()[0]
        self.output_name = self.session.get_outputs()[0].name
        return True

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_meta.name: x})[0]

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise InferenceError(f"model {self.name} takes one input ({self.input_meta.name}), got {len(payload.inputs)}")
        request_input = payload.inputs[0]
        if request_input.name != self.input_meta.name:
            raise InferenceError(f"model {self.name} has no input {request_input.name!r}; its input is "
                                 f"{self.input_meta.name!r}")
        if request_input.datatype != "FP32":
            raise InferenceError(f"input {request_input.name!r} must be FP32, got {request_input.datatype}")
        x = np.ascontiguousarray(NumpyCodec.decode_input(request_input), dtype=np.float32)
        scores = await asyncio.to_thread(self._run, x)
        scores = self.postprocess(np.asarray(scores, dtype=np.float32))
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name=self.output_name, payload=scores)],
        )

    def postprocess(self, scores: np.ndarray) -> np.ndarray:
        """The scores as sent back (a hook for subclasses; the identity here)."""
        return scores
