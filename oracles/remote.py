"""A black-box classifier behind an inference server: the Open Inference Protocol (v2), REST.

KServe, Triton, MLServer and TorchServe all speak it: ``POST {base}/v2/models/{name}
[/versions/{v}]/infer`` with a JSON body of input tensors, and a JSON answer of output
tensors. `RemoteClassifier` is a `BlackBoxClassifier` (oracles/classifier.py) that sends
image batches there and reads the scores back:

* **Metadata once.** At construction it reads ``GET {base}/v2/models/{name}[/versions/{v}]``
  and checks the input (one FP32 tensor of rank 4, [batch, C, H, W]) and the output; a
  model that does not fit is one `ModelMismatchError` line. `check_input_shape` compares
  the (C, H, W) of your images with it.
* **Throughput.** A call of N images is cut into requests of at most `max_batch` images;
  up to `in_flight` requests are in flight at once (a thread pool over one pooled
  `httpx.Client`; the answers are put back in order, so the result does not depend on
  which request finishes first).
* **Faults.** Every request has a timeout (`timeout_s`). Connection errors, timeouts, 5xx
  and 429 are retried up to `retries` times, waiting ``backoff_s x 2^k`` seconds (at most
  `max_delay_s`) with +-50% jitter, or what a 429/503's ``Retry-After`` asks for (capped by
  `max_delay_s`); other 4xx fail at once with the server's message. A malformed or
  non-finite answer is a `RemoteClassifierError` naming the request. When the retries of a
  request are used up, `ServerUnavailableError` is raised. All three are `OracleError`s:
  the trainer stops the run with its failed step undone, keeps the checkpoint, writes
  summary.json and prints one line with the resume command (docs/reliability.md). The
  retries happen here, per HTTP request, with the run's own policy (`run.oracle_retries`,
  `run.oracle_retry_backoff_s`); they are not repeated by the engine, which would re-send
  every request of the step for one that failed.
* **Accounting.** `queries` counts images classified, `calls` requests answered, `retried`
  requests re-sent after a transient failure; the engine's ledger counts loss values.
* **Security.** The bearer token comes from an environment variable or a file (`read_token`)
  and lives only in the client's headers: it is never part of a setting, a message or a
  file this package writes. TLS certificates are verified unless `verify_tls=False`;
  `ca_file` adds a private CA.

Needs the `remote` extra (httpx; orjson makes the JSON 10-20x faster and is used when
installed). Payloads are exact: float32 values go out and come back as their shortest
decimal form, which parses back to the same float32.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import re
import ssl
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from blackbox_zo.oracle import OracleError

from .classifier import Outputs, as_float32_tensor

__all__ = [
    "RemoteClassifier",
    "RemoteClassifierError",
    "ServerUnavailableError",
    "ModelMismatchError",
    "parse_model_url",
    "read_token",
    "retry_delay",
    "parse_retry_after",
]

_URL = re.compile(r"^(?P<base>https?://[^/]+(?:/.*?)?)/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/?$")


class RemoteClassifierError(OracleError):
    """The server answered something unusable, or refused the request (a 4xx other than 429)."""


class ServerUnavailableError(RemoteClassifierError):
    """A request still failed (connection error, timeout, 5xx, 429) after every retry."""


class ModelMismatchError(ValueError):
    """The served model does not take what we would send (input name, datatype, shape)."""


def parse_model_url(url: str) -> tuple[str, str, str | None]:
    """'http://h:8080/v2/models/NAME[/versions/V]' -> (base 'http://h:8080', NAME, V or None)."""
    m = _URL.match(url.strip())
    if m and "@" in m.group("base").split("://", 1)[1]:
        raise ValueError("the classifier URL must not carry credentials (user:password@); give the bearer token "
                         "in an environment variable or a file instead")
    if not m:
        raise ValueError(f"classifier URL {url!r} must look like http(s)://HOST[:PORT]/v2/models/NAME"
                         "[/versions/VERSION] (the Open Inference Protocol's model URL)")
    return m.group("base"), m.group("name"), m.group("version")


def read_token(env: str | None = None, file: str | Path | None = None) -> str | None:
    """The bearer token from the environment variable `env` or the file `file` (first line), or None.

    The token itself is never a setting: a setting names where it is.
    """
    if env:
        value = os.environ.get(env, "").strip()
        if value:
            return value
    if file:
        path = Path(file).expanduser()
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
        if not lines:
            raise ValueError(f"the token file {path} is empty")
        return lines[0]
    return None


def retry_delay(attempt: int, backoff_s: float, max_delay_s: float, rng: random.Random) -> float:
    """Seconds before retry `attempt` + 1: backoff_s x 2^attempt, +-50% jitter, at most max_delay_s."""
    base = min(max_delay_s, backoff_s * 2.0 ** attempt)
    return min(max_delay_s, base * (0.5 + rng.random()))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) -> seconds from now; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _json_dumps(obj: Any) -> bytes:
    try:
        import orjson
    except ImportError:  # the plain encoder: exact too, 10-20x slower on large batches
        return json.dumps(obj, default=lambda a: a.tolist()).encode()
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _json_loads(data: bytes) -> Any:
    try:
        import orjson
    except ImportError:
        return json.loads(data)
    return orjson.loads(data)


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's own wait, when it gave one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RemoteClassifier:
    """A v2 inference endpoint as a `BlackBoxClassifier`: images in, scores out, every image counted.

    `url` is the model's v2 URL (``http(s)://HOST[:PORT]/v2/models/NAME[/versions/V]``).
    `outputs` says whether the model returns logits or probabilities. `input_shape`
    (C, H, W), when given, is checked against the model's metadata at once.
    """

    def __init__(
        self,
        url: str,
        *,
        outputs: Outputs = "logits",
        max_batch: int = 512,
        in_flight: int = 4,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_delay_s: float = 60.0,
        token: str | None = None,
        verify_tls: bool = True,
        ca_file: str | Path | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        input_shape: Sequence[int] | None = None,
    ):
        try:
            import httpx
        except ImportError as exc:  # optional extra
            raise ImportError("a classifier behind a v2 endpoint needs httpx: pip install 'blackbox-zo[remote]'") from exc
        if outputs not in ("logits", "probabilities"):
            raise ValueError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
        for name, value, low in (("max_batch", max_batch, 1), ("in_flight", in_flight, 1), ("retries", retries, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not timeout_s > 0 or backoff_s < 0 or max_delay_s < 0:
            raise ValueError("timeout_s must be > 0, backoff_s and max_delay_s >= 0")
        self.base, self.model_name, self.model_version = parse_model_url(url)
        self.url = f"{self.base}/v2/models/{self.model_name}" + (
            f"/versions/{self.model_version}" if self.model_version else "")
        self.infer_url = f"{self.url}/infer"
        self.outputs = outputs
        self.max_batch, self.in_flight = int(max_batch), int(in_flight)
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self.backoff_s, self.max_delay_s = float(backoff_s), float(max_delay_s)
        self.queries = 0  # images classified
        self.calls = 0  # requests answered
        self.retried = 0  # requests re-sent after a transient failure
        self._lock = threading.Lock()
        self._rng = random.Random()  # jitter only: timing, never results
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        verify: Any = True
        if ca_file:
            verify = ssl.create_default_context(cafile=str(ca_file))
        elif not verify_tls:
            verify = False
        self.verify_tls = bool(verify_tls)
        self._client = httpx.Client(
            headers=headers, verify=verify, timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.in_flight, max_keepalive_connections=self.in_flight))
        self._pool: ThreadPoolExecutor | None = None
        try:
            self.metadata = self._read_metadata()
            self.input_name, self.input_shape_declared = self._pick_input(input_name)
            self.output_name, self.num_classes = self._pick_output(output_name)
            if input_shape is not None:
                self.check_input_shape(input_shape)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:  # never the token
        return f"RemoteClassifier({self.url!r}, max_batch={self.max_batch}, in_flight={self.in_flight})"

    # -- metadata --------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, Any]:
        def get() -> dict[str, Any]:
            resp = self._send("GET", self.url, None, "metadata request")
            try:
                meta = _json_loads(resp.content)
            except ValueError:
                raise RemoteClassifierError(f"metadata request to {self.url}: the answer is not JSON "
                                            f"({resp.content[:80]!r})") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), list):
                raise RemoteClassifierError(f"metadata request to {self.url}: no 'inputs' in the answer")
            return meta

        return self._with_retries(get, f"metadata request to {self.url}")

    def _pick_input(self, name: str | None) -> tuple[str, list[int] | None]:
        inputs = self.metadata["inputs"]
        where = f"model {self.model_name!r} at {self.url}"
        if name is None:
            if len(inputs) != 1:
                raise ModelMismatchError(f"{where} has {len(inputs)} inputs "
                                         f"({', '.join(str(i.get('name')) for i in inputs)}); images need exactly one")
            chosen = inputs[0]
        else:
            found = [i for i in inputs if i.get("name") == name]
            if not found:
                raise ModelMismatchError(f"{where} has no input {name!r}; its inputs: "
                                         f"{', '.join(str(i.get('name')) for i in inputs)}")
            chosen = found[0]
        if chosen.get("datatype") not in (None, "FP32"):
            raise ModelMismatchError(f"{where}: input {chosen.get('name')!r} takes {chosen.get('datatype')}, "
                                     "images are sent as FP32")
        shape = chosen.get("shape")
        if shape is not None and len(shape) != 4:
            raise ModelMismatchError(f"{where}: input {chosen.get('name')!r} has shape {shape}; images need "
                                     "[batch, channels, height, width]")
        return str(chosen.get("name")), (list(shape) if shape is not None else None)

    def _pick_output(self, name: str | None) -> tuple[str | None, int | None]:
        outputs = self.metadata.get("outputs") or []
        if name is not None:
            found = [o for o in outputs if o.get("name") == name]
            if outputs and not found:
                raise ModelMismatchError(f"model {self.model_name!r} at {self.url} has no output {name!r}; its "
                                         f"outputs: {', '.join(str(o.get('name')) for o in outputs)}")
            chosen = found[0] if found else {"name": name}
        else:
            chosen = outputs[0] if outputs else {}
        shape = chosen.get("shape")
        classes = int(shape[-1]) if shape and len(shape) == 2 and int(shape[-1]) > 0 else None
        return chosen.get("name"), classes

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        """ModelMismatchError (one line) unless images of shape (C, H, W) fit the model's input."""
        want = [int(s) for s in input_shape]
        declared = self.input_shape_declared
        if declared is None:
            return
        fits = all(d in (-1, w) for d, w in zip(declared[1:], want))
        if not fits:
            raise ModelMismatchError(
                f"model {self.model_name!r} at {self.url} takes input {self.input_name!r} of shape {declared}, "
                f"the images are [batch, {', '.join(map(str, want))}]")

    @property
    def identity(self) -> dict[str, Any]:
        """What names this classifier in a cache key: URL, model, version and its metadata."""
        return {"url": self.url, "model": self.model_name, "version": self.model_version,
                "metadata": {k: self.metadata.get(k) for k in ("name", "versions", "platform", "inputs", "outputs")}}

    # -- requests --------------------------------------------------------------------

    def _send(self, method: str, url: str, body: bytes | None, what: str):
        """One HTTP request: the response of a 2xx; _Transient to retry; RemoteClassifierError to stop."""
        import httpx

        try:
            resp = self._client.request(method, url, content=body)
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out after {self.timeout_s:g} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # connection refused / reset, DNS, TLS handshake, ...
            if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise RemoteClassifierError(f"{what}: TLS certificate verification failed ({exc}); give the "
                                            "server's CA with ca_file (verify_tls=false only for testing)") from None
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        status = resp.status_code
        if 200 <= status < 300:
            return resp
        message = _server_message(resp)
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}: {message}", parse_retry_after(resp.headers.get("Retry-After")))
        raise RemoteClassifierError(f"{what} refused with HTTP {status}: {message}")

    def _with_retries(self, attempt_fn, what: str):
        attempt = 0
        while True:
            try:
                return attempt_fn()
            except _Transient as exc:
                if attempt >= self.retries:
                    raise ServerUnavailableError(
                        f"{what} failed {attempt + 1} time(s) in a row (run.oracle_retries={self.retries}): {exc}"
                    ) from None
                delay = retry_delay(attempt, self.backoff_s, self.max_delay_s, self._rng)
                if exc.retry_after is not None:
                    delay = min(self.max_delay_s, exc.retry_after)
                time.sleep(delay)
                attempt += 1
                with self._lock:
                    self.retried += 1

    def _infer(self, x: np.ndarray, index: int, total: int, first: int) -> np.ndarray:
        what = (f"request {index + 1}/{total} (images {first}-{first + x.shape[0] - 1}) to {self.infer_url}")
        body = _json_dumps({"inputs": [{"name": self.input_name, "datatype": "FP32", "shape": list(x.shape),
                                        "data": x.reshape(-1)}]})

        def once() -> np.ndarray:
            resp = self._send("POST", self.infer_url, body, what)
            return self._scores(resp.content, x.shape[0], what)

        scores = self._with_retries(once, what)
        with self._lock:
            self.calls += 1
        return scores

    def _scores(self, content: bytes, n: int, what: str) -> np.ndarray:
        try:
            answer = _json_loads(content)
        except ValueError:
            raise RemoteClassifierError(f"{what}: the answer is not JSON ({content[:80]!r})") from None
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise RemoteClassifierError(f"{what}: the answer has no 'outputs'")
        if self.output_name is not None:
            found = [o for o in outputs if isinstance(o, dict) and o.get("name") == self.output_name]
            if not found:
                raise RemoteClassifierError(f"{what}: the answer has no output {self.output_name!r}")
            out = found[0]
        else:
            out = outputs[0]
        try:
            scores = np.asarray(out["data"], dtype=np.float32)
            shape = [int(s) for s in out["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteClassifierError(f"{what}: malformed output tensor ({type(exc).__name__}: {exc})") from None
        if scores.size != math.prod(shape):
            raise RemoteClassifierError(f"{what}: output {out.get('name')!r} has {scores.size} values for shape {shape}")
        if len(shape) != 2 or shape[0] != n:
            raise RemoteClassifierError(f"{what}: output {out.get('name')!r} has shape {shape}, expected [{n}, classes]")
        if self.num_classes is not None and shape[1] != self.num_classes:
            raise RemoteClassifierError(f"{what}: output {out.get('name')!r} has {shape[1]} classes, the model's "
                                        f"metadata says {self.num_classes}")
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            raise RemoteClassifierError(f"{what}: {bad} non-finite score(s) in the answer")
        return scores.reshape(shape)

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        x = as_float32_tensor(images)
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"images must be a non-empty batch [N, C, H, W], got shape {tuple(x.shape)}")
        arr = x.contiguous().numpy()
        starts = list(range(0, arr.shape[0], self.max_batch))
        total = len(starts)
        if total == 1 or self.in_flight == 1:
            parts = [self._infer(arr[s : s + self.max_batch], i, total, s) for i, s in enumerate(starts)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="oip")
            futures: list[Future] = [self._pool.submit(self._infer, arr[s : s + self.max_batch], i, total, s)
                                     for i, s in enumerate(starts)]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()  # requests not started yet are never sent
                wait(futures)
                raise failed[0].exception()  # type: ignore[misc]
            parts = [f.result() for f in futures]
        scores = np.concatenate(parts) if len(parts) > 1 else parts[0]
        classes = {p.shape[1] for p in parts}
        if len(classes) != 1:
            raise RemoteClassifierError(f"requests to {self.infer_url} answered with different numbers of classes "
                                        f"{sorted(classes)}")
        if self.num_classes is None:
            self.num_classes = int(scores.shape[1])
        with self._lock:
            self.queries += int(arr.shape[0])
        return torch.from_numpy(scores)

    def reset_queries(self) -> int:
        """Zero the image, request and retry counters; returns the image count it had."""
        n, self.queries, self.calls, self.retried = self.queries, 0, 0, 0
        return n

    def counters(self) -> dict[str, int]:
        return {"images": self.queries, "requests": self.calls, "requests_retried": self.retried}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._client.close()

    def __enter__(self) -> "RemoteClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _server_message(resp) -> str:
    """The server's own words: the v2 error body {"error": ...}, else the start of the text."""
    try:
        body = _json_loads(resp.content)
        if isinstance(body, dict) and body.get("error"):
            return " ".join(str(body["error"]).split())[:300]
        if isinstance(body, dict) and body.get("detail"):
            return " ".join(str(body["detail"]).split())[:300]
    except ValueError:
        pass
    text = " ".join(resp.text.split())[:300]
    return text or resp.reason_phrase or "(no message)"
