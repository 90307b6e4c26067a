"""RemoteClassifier against a real Open Inference Protocol server (MLServer in a subprocess, no mock).

One server per test session (`served` in conftest.py) serves the tiny pipeline's digits classifier (ONNX) as a healthy model
and as misbehaving ones (tests/oip_fault_runtime.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import pytest
import torch

from serve_helpers import SECRET


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_remote_scores_equal_the_in_process_session_bitwise(served):
    from oracles.classifier import OnnxClassifier
    from oracles.remote import RemoteClassifier

    server, stages, _, _ = served
    x = _images(1000)
    local = OnnxClassifier(stages.classifier_onnx)(x)
    with RemoteClassifier(server.model_url("digits"), max_batch=128, in_flight=3, input_shape=(1, 8, 8)) as remote:
        out = remote(x)
        # float32 out and back as shortest decimals: exact; same ONNX Runtime, same session options
        assert torch.equal(out, local)
        assert remote.counters() == {"images": 1000, "requests": math.ceil(1000 / 128), "requests_retried": 0}
        assert remote.num_classes == 10 and remote.input_name == "images"


def test_metadata_that_does_not_fit_the_images_is_one_line(served):
    from oracles.remote import ModelMismatchError, RemoteClassifier

    server = served[0]
    with pytest.raises(ModelMismatchError, match=r"takes input 'images' of shape \[-1, 1, 8, 8\], the images are "
                                                 r"\[batch, 3, 8, 8\]"):
        RemoteClassifier(server.model_url("digits"), input_shape=(3, 8, 8))
    with pytest.raises(ModelMismatchError, match="has no input 'pixels'"):
        RemoteClassifier(server.model_url("digits"), input_name="pixels")


def test_wrong_output_shape_is_an_oracle_error_naming_the_request(served):
    from blackbox_zo.oracle import OracleError
    from oracles.remote import RemoteClassifier, RemoteClassifierError

    server = served[0]
    with RemoteClassifier(server.model_url("bad-shape"), max_batch=8, in_flight=1) as remote:
        with pytest.raises(RemoteClassifierError, match=r"request 1/2 \(images 0-7\) to .*/v2/models/bad-shape/infer: "
                                                        r"output 'scores' has shape \[7, 10\], expected \[8, classes\]"):
            remote(_images(12))
        assert isinstance(RemoteClassifierError("x"), OracleError)
        assert remote.retried == 0  # a malformed answer is not retried


def test_non_finite_answer_is_an_oracle_error(served):
    from oracles.remote import RemoteClassifier, RemoteClassifierError

    with RemoteClassifier(served[0].model_url("nan")) as remote:
        with pytest.raises(RemoteClassifierError, match=r"request 1/1 \(images 0-3\).*1 non-finite score"):
            remote(_images(4))


def test_slow_server_times_out_retries_then_gives_up(served):
    from oracles.remote import RemoteClassifier, ServerUnavailableError

    with RemoteClassifier(served[0].model_url("slow"), timeout_s=0.25, retries=1, backoff_s=0.01) as remote:
        with pytest.raises(ServerUnavailableError, match=r"failed 2 time\(s\) in a row \(run.oracle_retries=1\): "
                                                         r"timed out after 0.25 s"):
            remote(_images(2))
        assert remote.retried == 1 and remote.calls == 0 and remote.queries == 0
    # the same model answers when the timeout allows it
    with RemoteClassifier(served[0].model_url("slow"), timeout_s=30) as remote:
        assert remote(_images(2)).shape == (2, 10)


def test_503_and_429_are_retried_honouring_retry_after(served):
    from oracles.remote import RemoteClassifier

    with RemoteClassifier(served[0].model_url("flaky"), retries=3, backoff_s=0.01, in_flight=1) as remote:
        start = time.monotonic()
        out = remote(_images(5))
        waited = time.monotonic() - start
    # 503 (backoff 0.01 s +-50%), then 429 with Retry-After: 0.3 s, then served
    assert out.shape == (5, 10) and remote.retried == 2 and remote.calls == 1
    assert waited >= 0.3  # the server's Retry-After was waited for (a lower bound only: the machine may be slow)


def test_other_4xx_fail_at_once_with_the_servers_message(served):
    from oracles.remote import RemoteClassifier, RemoteClassifierError

    with RemoteClassifier(served[0].model_url("auth"), retries=3, backoff_s=5.0) as remote:
        with pytest.raises(RemoteClassifierError, match="refused with HTTP 401: missing or wrong bearer token"):
            remote(_images(3))
        assert remote.retried == 0
    with RemoteClassifier(served[0].model_url("auth"), token=SECRET) as remote:
        assert remote(_images(3)).shape == (3, 10)
        assert SECRET not in repr(remote)


def test_retry_policy_backoff_jitter_and_retry_after_parsing():
    pytest.importorskip("httpx")
    from email.utils import formatdate

    from oracles.remote import parse_model_url, parse_retry_after, retry_delay

    rng = random.Random(0)
    for attempt in range(8):
        delays = [retry_delay(attempt, 0.5, 10.0, rng) for _ in range(200)]
        base = min(10.0, 0.5 * 2 ** attempt)
        assert all(min(10.0, 0.5 * base) <= d <= min(10.0, 1.5 * base) for d in delays)
        assert len(set(delays)) > 1 or base * 0.5 >= 10.0  # jittered unless capped
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert 9.0 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10.0
    assert parse_model_url("https://h:1/v2/models/m/versions/3") == ("https://h:1", "m", "3")
    with pytest.raises(ValueError, match="must look like"):
        parse_model_url("http://h:1/models/m")
    with pytest.raises(ValueError, match="must not carry credentials"):
        parse_model_url("http://user:pw@h:1/v2/models/m")


def test_tls_is_verified_by_default_and_the_token_is_read_from_env_or_file(served, tmp_path, monkeypatch):
    import ssl

    from oracles.remote import RemoteClassifier, read_token
    from problems.certified_defense.assets import ClassifierSettings

    url = served[0].model_url("digits")
    assert ClassifierSettings().verify_tls is True
    with RemoteClassifier(url) as remote:  # certificates are checked unless asked otherwise
        assert remote._client._transport._pool._ssl_context.verify_mode == ssl.CERT_REQUIRED
    with RemoteClassifier(url, verify_tls=False) as remote:
        assert remote._client._transport._pool._ssl_context.verify_mode == ssl.CERT_NONE

    token_file = tmp_path / "token"
    token_file.write_text(f"\n{SECRET}\nignored\n")
    monkeypatch.delenv("SOME_TOKEN", raising=False)
    assert read_token("SOME_TOKEN", token_file) == SECRET  # the file's first non-empty line
    monkeypatch.setenv("SOME_TOKEN", "from-env")
    assert read_token("SOME_TOKEN", token_file) == "from-env"  # the variable wins when set
    assert read_token(None, None) is None
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(None, token_file)
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token(None, tmp_path / "missing")


def _cli(args, capsys, monkeypatch, env=None):
    """The CLI in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from blackbox_zo.cli import main

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_through_the_endpoint_with_a_token_that_is_never_written(served, tmp_path, capsys, monkeypatch):
    server, _, overrides, _ = served
    out = tmp_path / "runs"
    args = ["train", "certified-defense", *sum((["--set", o] for o in overrides), []), "--set", f"run.out_dir={out}",
            "--set", f"classifier.source={server.model_url('auth')}", "--set", "classifier.max_batch=64"]
    code, out_text, err_text = _cli(args, capsys, monkeypatch, env={"BLACKBOX_ZO_TOKEN": SECRET})
    assert code == 0, err_text
    run = next((out / "certified-defense").glob("2*"))
    summary = json.loads((run / "summary.json").read_text())
    bb = summary["black_box"]
    # 2 steps x 38 loss values x 16 images, plus the labels of 1,437 training images and one evaluation
    d = 4 * 9 + 1
    n_test = 360
    assert summary["queries"]["train"] == 2 * (d + 1)
    assert bb["images"] == 1437 + 2 * (d + 1) * 16 + 2 * n_test
    assert bb["requests"] >= math.ceil(1437 / 64) and bb["requests_retried"] == 0
    for path in [*run.rglob("*"), *(tmp_path / "runs").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out_text + err_text
    # without the token: one line, the server's words, exit 2
    code, _, err_text = _cli(args, capsys, monkeypatch, env={"BLACKBOX_ZO_TOKEN": ""})
    assert code == 2 and "Traceback" not in err_text
    assert "HTTP 401: missing or wrong bearer token" in err_text and len(err_text.strip().splitlines()) == 1


def test_classifier_that_does_not_take_the_images_is_one_line_exit_2(served, tmp_path, capsys, monkeypatch):
    import numpy as np

    server, _, overrides, _ = served
    rgb = tmp_path / "rgb.npz"
    gen = np.random.default_rng(0)
    np.savez(rgb, x=gen.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8), y=np.repeat(np.arange(4), 10))
    for source in (server.model_url("digits"), str(served[1].classifier_onnx)):
        code, _, err_text = _cli(["train", "certified-defense", *sum((["--set", o] for o in overrides), []),
                                  "--set", f"run.out_dir={tmp_path / 'runs'}", "--set", f"classifier.source={source}",
                                  "--set", f"images.source={rgb}"], capsys, monkeypatch)
        assert code == 2 and "Traceback" not in err_text, err_text
        assert len(err_text.strip().splitlines()) == 1
        assert "the images are [batch, 3, 8, 8]" in err_text
    assert not (tmp_path / "runs" / "certified-defense").exists() or not any(
        p.name.startswith("2") for p in (tmp_path / "runs" / "certified-defense").iterdir())


def test_serve_onnx_serves_the_file_and_stops_its_server_on_sigterm(tiny_defense, tmp_path):
    """`blackbox-zo serve-onnx MODEL.onnx` as a user runs it: a subprocess printing the model's URL, answering
    like the in-process session, and leaving no server behind after SIGTERM."""
    import signal
    import subprocess
    import sys

    import httpx

    from serve_helpers import need_serve_extra

    need_serve_extra()
    from oracles.classifier import OnnxClassifier
    from oracles.remote import RemoteClassifier
    from oracles.serving import free_port

    onnx = tiny_defense[0].classifier_onnx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blackbox_zo.cli", "serve-onnx", str(onnx), "--name", "mine",
                             "--port", str(port), "--dir", str(tmp_path / "repo")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server and the model are ready
        url = f"http://127.0.0.1:{port}/v2/models/mine"
        assert line.startswith(f"serving {onnx} at {url} "), (line, proc.stderr.read() if proc.poll() else "")
        x = _images(300, seed=3)
        with RemoteClassifier(url, max_batch=100, input_shape=(1, 8, 8)) as remote:
            assert torch.equal(remote(x), OnnxClassifier(onnx)(x))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopping the server" in proc.stderr.read()
        with pytest.raises(httpx.ConnectError):  # MLServer went with it
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
