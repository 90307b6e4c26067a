"""run.loggers: what TensorBoard and MLflow hold, read back with their own readers, equals metrics.jsonl.

The runs are tiny (the 4-parameter `fault-bowl-v1` oracle of tests/fault_oracles.py, trained
directly: 5 queries a step, one per evaluation). TensorBoard is read with its event reader
(`EventAccumulator`, which applies `purge_step` as TensorBoard does); MLflow with its client on
a SQLite store shared by this module's tests (creating one costs seconds of migrations).
TensorBoard stores scalars as float32, so its values are compared with metrics.jsonl's cast
to float32 (exactly); MLflow keeps float64 and is compared exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

import fault_oracles  # noqa: E402  (registers fault-bowl-v1)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from blackbox_zo import cli, rundir  # noqa: E402
from blackbox_zo.problem import get_problem  # noqa: E402
from blackbox_zo.trackers import MLFLOW_LINES_TAG, STATE_NAME  # noqa: E402
from blackbox_zo.trainer import train  # noqa: E402

TESTS = Path(__file__).resolve().parent
BOWL = fault_oracles.NAME
BASE = ["oracle.steps_per_epoch=4", "run.epochs=3", "run.progress=false", "schedule=cosine"]


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite store for the module (MLFLOW_TRACKING_URI), as a team's shared store would be."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "blackbox-zo-tests")
        yield uri


@pytest.fixture
def client(mlflow_store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_store)


def config(*overrides):
    problem = get_problem(BOWL)
    return problem, problem.resolve_config(overrides=[*BASE, *overrides])


class Crash(Exception):
    """A crash in the middle of a run (after the records before it were logged)."""


def crash_at(step):
    def callback(trainer, record):
        if "loss" in record and record["step"] == step:
            raise Crash(f"crash at step {step}")
    return callback


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def expected_points(recs):
    """tag -> [(x, value)] by the rule of docs/tracking.md, written out independently of the trackers."""
    out = defaultdict(list)
    for r in recs:
        is_step = "loss" in r
        for key, value in r.items():
            if key in ("step", "queries") or isinstance(value, (str, bool)):
                continue
            if not is_step and key in ("epoch", "wall_s"):
                continue
            out[f"by_step/{key}"].append((r["step"], float(value)))
            out[f"by_queries/{key}"].append((r["queries"], float(value)))
        if is_step:
            out["by_step/queries"].append((r["step"], float(r["queries"])))
            out["by_queries/step"].append((r["queries"], float(r["step"])))
    return dict(out)


def tensorboard_points(run_dir):
    out = {}
    for axis in ("by_step", "by_queries"):
        acc = EventAccumulator(str(Path(run_dir) / "tensorboard" / axis), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def mlflow_run_id(run_dir):
    return json.loads((Path(run_dir) / STATE_NAME).read_text())["mlflow"]["run_id"]


def mlflow_points(client, run_id):
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics}


def assert_tensorboard_equals_jsonl(run_dir):
    want = expected_points(records(run_dir))
    got = tensorboard_points(run_dir)
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [(x, np.float32(v)) for x, v in points] == [(x, np.float32(v)) for x, v in got[tag]], tag


def assert_mlflow_equals_jsonl(client, run_dir):
    recs = records(run_dir)
    want = expected_points(recs)
    run_id = mlflow_run_id(run_dir)
    got = mlflow_points(client, run_id)
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert sorted(points) == got[tag], tag  # every point once, value for value
    assert client.get_run(run_id).data.tags[MLFLOW_LINES_TAG] == str(len(recs))


# ------------------------------------------------------------------------------ a whole run


def test_a_run_logs_every_record_config_summary_and_plots_to_both_trackers(tmp_path, client, mlflow_store):
    problem, cfg = config("run.loggers=tensorboard,mlflow")
    summary = train(problem, cfg, run_dir=tmp_path / "run")
    run_dir = tmp_path / "run"
    recs = records(run_dir)
    assert len([r for r in recs if "loss" in r]) == 12 and any("eval/eval_loss" in r for r in recs)
    assert_tensorboard_equals_jsonl(run_dir)
    assert_mlflow_equals_jsonl(client, run_dir)

    # TensorBoard: the resolved config as hparams of the by_step run, the summary as text
    acc = EventAccumulator(str(run_dir / "tensorboard" / "by_step"), size_guidance={"tensors": 0})
    acc.Reload()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == cfg.optimizer.lr
    assert hparams["estimator.kind"].string_value == "cge"
    text = acc.Tensors("summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert json.loads(text.split("```json\n", 1)[1].rsplit("```", 1)[0]) == summary
    images = EventAccumulator(str(run_dir / "tensorboard" / "by_step"), size_guidance={"images": 0})
    images.Reload()
    (plot,) = images.Images("plots/training")
    assert plot.encoded_image_string == (run_dir / "training.png").read_bytes() and plot.step == 12

    # MLflow: params = the resolved config, tags = the summary, artifacts = PNG, config.json, summary.json
    run = client.get_run(mlflow_run_id(run_dir))
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr) and run.data.params["run.epochs"] == "3"
    assert run.data.params["run.loggers"] == '["jsonl", "tensorboard", "mlflow"]'

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}).items()}

    assert set(run.data.params) == set(flat(json.loads((run_dir / "config.json").read_text())))
    assert run.data.tags["summary.stopped"] == "completed" and run.data.tags["summary.steps"] == "12"
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"training.png", "config.json", "summary.json"}
    store = Path(mlflow_store[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())  # beside the store, not ./mlruns


def test_a_crash_and_a_resume_that_changes_the_schedule_leave_each_point_once(tmp_path, client):
    """Step 10 was logged after the step-9 checkpoint, then the run crashed; the resume (with more
    epochs: a longer cosine, so a new step 10) must replace it, not add to it."""
    problem, cfg = config("run.loggers=tensorboard,mlflow", "run.checkpoint_every_steps=3")
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(problem, cfg, run_dir=run_dir, callbacks=[crash_at(11)])
    before = records(run_dir)
    assert [r["step"] for r in before if "loss" in r][-1] == 10  # logged past the checkpoint of step 9
    tb_before = tensorboard_points(run_dir)
    assert tb_before["by_step/loss"][-1][0] == 10  # TensorBoard had it live
    ml_before = mlflow_points(client, mlflow_run_id(run_dir))
    assert ml_before["by_step/loss"][-1][0] == 9  # MLflow only what the checkpoint holds
    assert client.get_run(mlflow_run_id(run_dir)).info.status == "FAILED"
    run_id = mlflow_run_id(run_dir)

    problem, cfg2 = config("run.loggers=tensorboard,mlflow", "run.checkpoint_every_steps=3", "run.epochs=4")
    train(problem, cfg2, resume=run_dir)
    after = records(run_dir)
    step10 = [r for r in after if r.get("step") == 10 and "loss" in r][0]
    old10 = [r for r in before if r.get("step") == 10 and "loss" in r][0]
    assert step10["lr"] != old10["lr"]  # the resumed step 10 is another point: a stale one would show
    assert [r["step"] for r in after if "loss" in r] == list(range(1, 17))
    assert_tensorboard_equals_jsonl(run_dir)
    assert mlflow_run_id(run_dir) == run_id  # the same MLflow run, continued
    assert_mlflow_equals_jsonl(client, run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_with.run.epochs"] == "4"
    assert run.data.params["run.epochs"] == "3"  # MLflow params are written once


def test_a_resume_from_the_previous_checkpoint_moves_mlflow_to_a_new_run_and_purges_tensorboard(tmp_path, client):
    """The newest checkpoint (step 9) is damaged: the resume starts from step 6, behind what MLflow holds."""
    problem, cfg = config("run.loggers=tensorboard,mlflow", "run.checkpoint_every_steps=3")
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(problem, cfg, run_dir=run_dir, callbacks=[crash_at(11)])
    old_run = mlflow_run_id(run_dir)
    assert mlflow_points(client, old_run)["by_step/loss"][-1][0] == 9
    newest = run_dir / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(Warning, match="new MLflow run, filled from metrics.jsonl"):
        train(problem, cfg, resume=run_dir)
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 13))
    assert mlflow_run_id(run_dir) != old_run
    assert client.get_run(old_run).data.tags["blackbox_zo.superseded"] == "true"
    assert_mlflow_equals_jsonl(client, run_dir)
    assert_tensorboard_equals_jsonl(run_dir)


def test_tensorboard_left_out_on_one_resume_and_added_back_on_the_next_shows_the_run_that_went_on(tmp_path):
    """Step 10 reached TensorBoard, then the run crashed; a resume without TensorBoard redid step 10 (with
    another schedule); a later resume with TensorBoard again must not keep the first step 10."""
    problem, cfg = config("run.loggers=tensorboard", "run.checkpoint_every_steps=3")
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(problem, cfg, run_dir=run_dir, callbacks=[crash_at(11)])
    first10 = tensorboard_points(run_dir)["by_step/lr"][-1]
    problem, cfg = config("run.checkpoint_every_steps=3", "run.epochs=4")
    train(problem, cfg, resume=run_dir)
    problem, cfg = config("run.checkpoint_every_steps=3", "run.epochs=5", "run.loggers=tensorboard")
    train(problem, cfg, resume=run_dir)
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 21))
    assert first10[0] == 10 and tensorboard_points(run_dir)["by_step/lr"][9] != first10
    assert_tensorboard_equals_jsonl(run_dir)


def test_a_logger_added_on_resume_is_filled_from_metrics_jsonl(tmp_path, client):
    problem, cfg = config("run.checkpoint_every_steps=3")
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(problem, cfg, run_dir=run_dir, callbacks=[crash_at(8)])
    assert not (run_dir / "tensorboard").exists() and not (run_dir / STATE_NAME).exists()
    problem, cfg2 = config("run.checkpoint_every_steps=3", "run.loggers=tensorboard,mlflow")
    train(problem, cfg2, resume=run_dir)
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 13))
    assert_tensorboard_equals_jsonl(run_dir)
    assert_mlflow_equals_jsonl(client, run_dir)
    assert json.loads((run_dir / "config.json").read_text())["run"]["loggers"] == ["jsonl", "tensorboard", "mlflow"]


@pytest.mark.slow  # ~15-40 s: a fresh interpreter imports torch and mlflow; the crash test above covers the rest
def test_kill_9_between_checkpoints_then_resume_leaves_each_point_once(tmp_path, client, mlflow_store):
    """A real kill: nothing flushed or closed. TensorBoard may miss its unflushed tail and hold points
    past the checkpoint; MLflow holds what a checkpoint held. The resume reconciles both."""
    argv = [sys.executable, str(TESTS / "fault_oracles.py"), "train", BOWL, *[a for s in BASE for a in ("--set", s)],
            "--set", "run.epochs=4", "--set", "run.checkpoint_every_steps=4", "--set", "oracle.options.sleep_s=0.05",
            "--set", "run.loggers=tensorboard,mlflow", "--set", f"run.out_dir={tmp_path}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "MLFLOW_EXPERIMENT_NAME": "blackbox-zo-tests"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        metrics = None
        while time.time() < deadline:
            found = list(tmp_path.glob(f"{BOWL}/*/metrics.jsonl"))
            if found and len([r for r in records(found[0].parent) if "loss" in r]) >= 10:
                metrics = found[0]
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert metrics is not None, "the run did not reach step 10"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    run_dir = metrics.parent
    killed_at = max(r["step"] for r in records(run_dir))
    assert killed_at > 8  # past the checkpoint of step 8
    problem, cfg = config("run.epochs=4", "run.checkpoint_every_steps=4", "run.loggers=tensorboard,mlflow",
                          f"run.out_dir={tmp_path}")
    cfg.oracle.options = {"sleep_s": 0.05}
    train(problem, cfg, resume=run_dir)
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 17))
    assert_tensorboard_equals_jsonl(run_dir)
    assert_mlflow_equals_jsonl(client, run_dir)


# ------------------------------------------------------------------------- packages, ranks


@pytest.mark.parametrize("logger, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_chosen_logger_whose_package_is_missing_is_one_line_and_exit_2_before_anything(
        tmp_path, capsys, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    monkeypatch.chdir(tmp_path)
    queried = []
    monkeypatch.setattr(fault_oracles.FaultBowl, "__init__", lambda *a, **k: queried.append(1))
    code = cli.main(["train", BOWL, "--set", f"run.loggers={logger}", "--set", "run.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"run.loggers includes {logger!r}" in err[0] and f"pip install 'blackbox-zo[{logger}]'" in err[0]
    assert not queried  # refused before the problem was set up
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.*"))


def test_only_the_main_rank_logs(tmp_path, monkeypatch):
    from blackbox_zo import parallel

    monkeypatch.setattr(parallel, "is_main_process", lambda: False)
    problem, cfg = config("run.loggers=tensorboard,mlflow", "run.max_steps=3")
    (tmp_path / "run").mkdir()
    train(problem, cfg, run_dir=tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # no tensorboard/, no trackers.json, no MLflow run


def two_ranks(tmp_path, mlflow_store, *args):
    """`blackbox-zo train` as torchrun's two workers, started by hand (as tests/test_faults.py does)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_store,
               "MLFLOW_EXPERIMENT_NAME": "blackbox-zo-ranks"}
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "fault_oracles.py"), "train", BOWL, *args],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], results


@pytest.mark.slow  # ~1-2 min: four interpreters import torch; the main-rank test above covers the logic
@pytest.mark.distributed
def test_under_two_ranks_only_the_main_rank_logs_also_on_resume(tmp_path, client, mlflow_store):
    """One TensorBoard point per step and one MLflow run, not two, when both ranks know the run directory
    (a resume)."""
    sets = [a for x in [*BASE, "run.loggers=tensorboard,mlflow", "parallel.timeout_s=120"] for a in ("--set", x)]
    two_ranks(tmp_path, mlflow_store, *sets, "--set", "run.max_steps=3")
    (run_dir,) = (tmp_path / "runs" / BOWL).iterdir()
    two_ranks(tmp_path, mlflow_store, *sets, "--set", "run.max_steps=6", "--resume", str(run_dir))
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_tensorboard_equals_jsonl(run_dir)
    assert_mlflow_equals_jsonl(client, run_dir)
    experiment = client.get_experiment_by_name("blackbox-zo-ranks")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_loggers_may_change_on_resume_and_jsonl_is_always_on():
    from blackbox_zo.config import RunConfig

    assert "run.loggers" in rundir.RESUMABLE_SETTINGS
    assert RunConfig(loggers=["mlflow"]).loggers == ["jsonl", "mlflow"]
    assert RunConfig(loggers="mlflow,tensorboard").loggers == ["jsonl", "tensorboard", "mlflow"]
    with pytest.raises(ValueError, match="wandb"):
        RunConfig(loggers=["wandb"])
