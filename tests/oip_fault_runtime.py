"""A misbehaving MLServer runtime for the fault tests (imported by the test server only).

`parameters.extra.fault` chooses the misbehaviour of an otherwise correct ONNX model:

* ``slow``: answers after `delay_s` seconds;
* ``bad_shape``: drops the last row of the scores;
* ``nan``: the first score is NaN;
* ``flaky``: of every three requests, the first answers 503, the second 429 with
  ``Retry-After: retry_after``, the third is served;
* ``auth``: refuses (401) a request without ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import HTTPException
from mlserver.types import InferenceRequest, InferenceResponse

from oracles.oip_runtime import OnnxRuntimeModel


class FaultyOnnxModel(OnnxRuntimeModel):
    async def load(self) -> bool:
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        self.fault = extra.get("fault", "")
        self.delay_s = float(extra.get("delay_s", 1.0))
        self.retry_after = str(extra.get("retry_after", "0.2"))
        self.token = extra.get("token", "")
        self.requests = 0
        return await super().load()

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        self.requests += 1
        if self.fault == "slow":
            await asyncio.sleep(self.delay_s)
        elif self.fault == "flaky" and self.requests % 3 == 1:
            raise HTTPException(status_code=503, detail="busy, try again")
        elif self.fault == "flaky" and self.requests % 3 == 2:
            raise HTTPException(status_code=429, detail="too many requests",
                                headers={"Retry-After": self.retry_after})
        elif self.fault == "auth":
            headers = (payload.parameters.headers if payload.parameters else None) or {}
            given = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
            if given != f"Bearer {self.token}":
                raise HTTPException(status_code=401, detail="missing or wrong bearer token")
        return await super().predict(payload)

    def postprocess(self, scores: np.ndarray) -> np.ndarray:
        if self.fault == "bad_shape":
            return scores[:-1]
        if self.fault == "nan":
            scores = scores.copy()
            scores.flat[0] = np.nan
        return scores
