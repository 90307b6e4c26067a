"""The certified defense against a classifier behind a real MLServer: a server killed in the middle
of a fine-tune (the run stops in one line, resumable, and ends bitwise where an uninterrupted
run ends), and certification through the server equal to certification through the
in-process ONNX session (same seeds)."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import as_sets, only_run, run_cli


@pytest.fixture
def digits_server(served):
    """(server, onnx path, overrides): the session's server; its model "digits" is the tiny classifier."""
    server, stages, overrides, _ = served
    return server, stages.classifier_onnx, [o for o in overrides if not o.startswith("run.out_dir=")]


def test_server_killed_mid_finetune_stops_cleanly_and_the_resume_ends_bitwise(digits_server, tmp_path, capsys):
    server, _, overrides = digits_server
    url = server.model_url("digits")
    common = overrides + ["run.max_steps=8", "run.checkpoint_every_steps=1", "run.oracle_retries=2",
                          "run.oracle_retry_backoff_s=0.05", f"classifier.source={url}", "classifier.max_batch=64",
                          "classifier.timeout_s=10"]
    # the reference: the same run, uninterrupted
    code, _, err = run_cli(["train", "certified-defense", *as_sets(common + [f"run.out_dir={tmp_path / 'ref'}"])],
                           capsys)
    assert code == 0, err
    ref = only_run(tmp_path / "ref")

    # the server is SIGKILLed once the run has logged 3 steps
    out = tmp_path / "cut"
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = list((out / "certified-defense").glob("2*/metrics.jsonl")) if out.exists() else []
            if runs and len(runs[0].read_text().splitlines()) >= 3:
                server.kill()
                killed.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        code, _, err = run_cli(["train", "certified-defense", *as_sets(common + [f"run.out_dir={out}"])], capsys)
    finally:
        watcher.join(timeout=60)
        if not server.running:  # back for the resume below (and for the session's other tests)
            server.start()
    assert killed.is_set()
    run = only_run(out)
    summary = json.loads((run / "summary.json").read_text())
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("blackbox-zo: training stopped: step ")
    assert "failed 3 time(s) in a row (run.oracle_retries=2)" in lines[0] and "/v2/models/digits/infer" in lines[0]
    assert lines[0].endswith(f"resume with: blackbox-zo train certified-defense --resume {run}")
    assert summary["stopped"] == "oracle error" and summary["checkpoint_step"] == summary["stop_step"] - 1 >= 3
    assert summary["black_box"]["requests_retried"] >= 2  # the failed request was re-sent before giving up

    # the server is back (same port): the resume completes and ends where the uninterrupted run ended
    code, _, err = run_cli(["train", "certified-defense", "--resume", run], capsys)
    assert code == 0, err
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["module"].keys() == b["module"].keys()
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    # the loss values of the failed request were charged when it was sent, and are charged again when the
    # resumed run sends them (docs/reliability.md): the base point (1) and/or the 37 coordinates of that step
    extra = b["ledger"]["counts"]["train"] - a["ledger"]["counts"]["train"]
    assert extra in (1, 37, 38) and a["ledger"]["counts"]["train"] == 8 * 38
    losses = [[json.loads(x).get("loss") for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, run)]
    assert losses[0] == losses[1]
    assert json.loads((run / "summary.json").read_text())["stopped"] == "completed"


def test_certify_through_the_server_equals_the_in_process_session(digits_server, tmp_path, capsys):
    server, onnx, overrides = digits_server
    out = tmp_path / "runs"
    code, _, err = run_cli(["train", "certified-defense",
                          *as_sets(overrides + [f"run.out_dir={out}", f"classifier.source={onnx}"])], capsys)
    assert code == 0, err
    run = only_run(out)
    small = ["--n", "200", "--n0", "10", "--test-size", "10", "--no-progress", "--batch", "500"]
    tables = {}
    for name, source in (("local", str(onnx)), ("served", server.model_url("digits"))):
        code, stdout, err = run_cli(["certify", run, *small, "--out", tmp_path / name,
                                   "--set", f"classifier.source={source}", "--set", "classifier.max_batch=256"], capsys)
        assert code == 0, err
        tables[name] = (list(csv.DictReader(open(tmp_path / name / "certify.csv"))),
                        (tmp_path / name / "table.md").read_text().split("\n\n", 1)[1])
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["black_box"]["images"] == 10 * (10 + 200) + (1 if name == "local" else 0)
    assert tables["served"] == tables["local"]
    assert len(tables["local"][0]) == 10 and any(float(r["radius"]) > 0 for r in tables["local"][0])
    # certified again: read back from points.jsonl, nothing sent
    code, _, err = run_cli(["certify", run, *small, "--out", tmp_path / "served",
                          "--set", f"classifier.source={server.model_url('digits')}"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["reused_points"] == 10 and summary["black_box"]["images"] == 0


@pytest.mark.slow
def test_full_size_certify_through_the_server_equals_the_in_process_session(tmp_path, capsys):
    """The end-to-end check at full size: the default pipeline (stages 1-2, the 20-epoch ZO fine-tune),
    then CERTIFY at N = 10,000 on 200 test images through MLServer and through the in-process ONNX
    session. BBZO_E2E_RUN=RUN_DIR certifies an existing run instead of training one; BBZO_E2E_N and
    BBZO_E2E_IMAGES change N and the number of images (docs/certified-defense.md reports the run)."""
    import os

    from serve_helpers import need_serve_extra

    need_serve_extra()
    from blackbox_zo import rundir
    from blackbox_zo.config import resolve_config
    from oracles.serving import OipServer, ServedModel
    from problems.certified_defense import CertifiedDefenseConfig, prepare_stages

    if os.environ.get("BBZO_E2E_RUN"):
        run = Path(os.environ["BBZO_E2E_RUN"])
    else:
        code, _, err = run_cli(["train", "certified-defense", "--set", f"run.out_dir={tmp_path / 'runs'}",
                              "--set", "run.progress=false"], capsys)
        assert code == 0, err
        run = only_run(tmp_path / "runs")
    config = resolve_config(CertifiedDefenseConfig, rundir.read_run_config(run), None, [])
    onnx = prepare_stages(config, log=lambda *_: None).classifier_onnx
    n, images = os.environ.get("BBZO_E2E_N", "10000"), os.environ.get("BBZO_E2E_IMAGES", "200")
    args = ["--n", n, "--n0", "100", "--test-size", images, "--no-progress"]
    tables = {}
    with OipServer([ServedModel("digits", onnx)], tmp_path / "repo") as server:
        for name, source in (("local", str(onnx)), ("served", server.model_url("digits"))):
            code, stdout, err = run_cli(["certify", run, *args, "--out", tmp_path / name,
                                       "--set", f"classifier.source={source}"], capsys)
            assert code == 0, err
            print(f"[{name}] {stdout}")
            tables[name] = (list(csv.DictReader(open(tmp_path / name / "certify.csv"))),
                            (tmp_path / name / "table.md").read_text().split("\n\n", 1)[1])
    assert tables["served"] == tables["local"]
