"""The fault suite: every fault a user can meet ends in one line, an exit code, and no lost run.

One table, one row per fault (docs/reliability.md prints the same table): the command, the
exit code it must give, a fragment of its one-line message, and the files that must and
must not exist afterwards. No row may print a Python traceback. Most rows run the CLI in
this process (`blackbox_zo.cli.main`), which behaves as the console script does; the rows
whose point is a signal, an operating-system limit or a traceback on a real stderr run it
in a fresh interpreter (`python tests/fault_oracles.py ...`, the CLI with the test oracle
registered).

The runs are tiny: the `fault-bowl-v1` oracle (tests/fault_oracles.py, a 4-parameter bowl
with faults switched on by options) and, where the issue's own cases need it, digits at
width 2.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import fault_oracles
from blackbox_zo import rundir
from blackbox_zo.cli import main

TESTS = Path(__file__).resolve().parent
BOWL = fault_oracles.NAME
QUIET = ["--set", "run.progress=false"]
# the bowl: 10 steps per epoch, 2 epochs, a checkpoint every 5 steps (so there is a previous one)
BOWL_RUN = ["--set", "run.epochs=2", "--set", "run.checkpoint_every_steps=5", *QUIET]
DIGITS_RUN = ["--set", "model.width=2", "--set", "data.batch_size=32", "--set", "run.epochs=1",
              "--set", "run.max_steps=2", "--set", "sparsity.q=8", *QUIET]


# --------------------------------------------------------------------------- helpers


def only_run(tmp: Path, problem: str = BOWL) -> Path:
    (run,) = (tmp / "runs" / problem).iterdir()
    return run


def summary_of(run: Path) -> dict:
    return json.loads((run / rundir.SUMMARY_NAME).read_text())


def copy_run(src: Path, tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Finished runs the resume and damage rows start from (copied per row)."""
    base = tmp_path_factory.mktemp("prepared")
    assert main(["train", BOWL, "--set", f"run.out_dir={base / 'b' / 'runs'}", *BOWL_RUN]) == 0
    assert main(["train", "digits", "--set", f"run.out_dir={base / 'd' / 'runs'}", *DIGITS_RUN]) == 0
    return {"bowl": only_run(base / "b"), "digits": only_run(base / "d", "digits")}


# ------------------------------------------------------------------------------ rows


@dataclass
class Row:
    case: str
    argv: list[str]  # {tmp} and {run} are filled in; {run} is the copy `prepare` made
    code: int
    message: str  # a fragment of the one-line message (stderr; stdout where `stream="out"`)
    exists: tuple[str, ...] = ()  # globs under {tmp} that must match afterwards
    absent: tuple[str, ...] = ()  # globs under {tmp} that must not
    prepare: Callable[[Path, dict], None] | None = None
    check: Callable[[Path, str, str], None] | None = None  # more assertions on (tmp, stdout, stderr)
    stream: str = "err"
    err_lines: int = 1  # lines on stderr at most (warnings + the final line)
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    subprocess: bool = False
    skip_if: Callable[[], str | None] | None = None


def _copy(name):
    def prepare(tmp, runs):
        copy_run(runs[name], tmp)
    return prepare


def _truncate(name, file=rundir.CHECKPOINT_NAME, keep_prev=True):
    def prepare(tmp, runs):
        run = copy_run(runs[name], tmp)
        data = (run / file).read_bytes()
        (run / file).write_bytes(data[: len(data) // 2])
        if not keep_prev:
            (run / rundir.PREVIOUS_CHECKPOINT_NAME).unlink()
    return prepare


def _flip_a_tensor_byte(tmp, runs):
    """Readable but wrong: a byte of the stored parameters flipped (torch.load does not notice)."""
    run = copy_run(runs["bowl"], tmp)
    path = run / rundir.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    data = bytearray(path.read_bytes())
    needle = state["module"]["blocks.x"].numpy().tobytes()
    at = data.find(needle)
    assert at > 0
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _only_prev(tmp, runs):
    """Killed between the two renames of a rotation: checkpoint.pt gone, the previous one there."""
    run = copy_run(runs["bowl"], tmp)
    (run / rundir.CHECKPOINT_NAME).unlink()
    (run / f".{rundir.CHECKPOINT_NAME}.tmp999").write_bytes(b"half a file")


def _config_only(tmp, runs):
    """Killed -9 during setup: a run directory with config.json only."""
    run = tmp / "run"
    run.mkdir()
    shutil.copy(runs["bowl"] / rundir.CONFIG_NAME, run / rundir.CONFIG_NAME)


def _damaged_config(tmp, runs):
    run = copy_run(runs["bowl"], tmp)
    (run / rundir.CONFIG_NAME).write_text('{"problem": "fault-bowl-v1", "run": {')


def _bad_toml(tmp, runs):
    (tmp / "bad.toml").write_text("[optimizer\nlr = 0.1\n")


def _lr_file(tmp, runs):
    copy_run(runs["digits"], tmp)
    (tmp / "lr.toml").write_text("[optimizer]\nlr = 0.05\n")


def _same_file(tmp, runs):
    copy_run(runs["digits"], tmp)
    (tmp / "same.toml").write_text("[optimizer]\nlr = 0.1\n[run]\nmax_steps = 3\n")


def _file_under_a_file(tmp, runs):
    (tmp / "a-file").write_text("not a directory")


def _config_unchanged(name):
    def check(tmp, out, err):
        assert (tmp / "run" / rundir.CONFIG_NAME).read_text() == (PREPARED[name] / rundir.CONFIG_NAME).read_text()
        # and the run is not lost: a plain resume and eval of it still work
        assert main(["eval", str(tmp / "run")]) == 0
    return check


def _config_says(key, value):
    def check(tmp, out, err):
        run = tmp / "run" if (tmp / "run").exists() else only_run(tmp, "digits" if "digits" in key else BOWL)
        cfg = json.loads((run / rundir.CONFIG_NAME).read_text())
        section, name = key.split(".")[-2:]
        assert cfg[section][name] == value, cfg[section]
    return check


def _summary_says(**expected):
    def check(tmp, out, err):
        run = tmp / "run" if (tmp / "run").exists() else only_run(tmp)
        s = summary_of(run)
        for k, v in expected.items():
            if v is ABSENT:
                assert k not in s, (k, s)
            else:
                assert s.get(k) == v, (k, s.get(k), v)
    return check


ABSENT = object()


def _enospc_on_second_checkpoint(monkeypatch, tmp):
    """A disk that fills up: the second checkpoint write fails with ENOSPC at fsync."""
    real, seen = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if str(tmp) in name and f".{rundir.CHECKPOINT_NAME}.tmp" in name:
            seen.append(name)
            if len(seen) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _no_module(name):
    def patch(monkeypatch, tmp):
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, key)
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as if not installed
    return patch


def _broken_plugin(monkeypatch, tmp):
    """An installed distribution whose oracle entry point cannot be imported."""
    import importlib

    from blackbox_zo.oracle import ORACLES

    site = tmp / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[blackbox_zo.oracles]\nbroken-v1 = no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(site))
    for attr in ("_entries", "_origins", "errors", "_seen_entry_points"):  # the registry as it was, afterwards
        monkeypatch.setattr(ORACLES, attr, type(getattr(ORACLES, attr))(getattr(ORACLES, attr)))
    importlib.invalidate_caches()


def _cuda_present():
    return "this machine has CUDA" if torch.cuda.is_available() else None


ROWS = [
    # ---- settings and usage
    Row("bad --config path", ["train", BOWL, "--config", "{tmp}/missing.toml"], 2, "config file not found",
        absent=("runs",)),
    Row("unparsable TOML", ["train", BOWL, "--config", "{tmp}/bad.toml"], 2, "cannot parse", absent=("runs",),
        prepare=_bad_toml),
    Row("unknown setting", ["train", BOWL, "--set", "estimator.typo=1"], 2,
        "estimator.typo: Extra inputs are not permitted", absent=("runs",)),
    Row("value out of range", ["train", BOWL, "--set", "run.epochs=0"], 2,
        "run.epochs: Input should be greater than or equal to 1", absent=("runs",)),
    Row("unknown problem", ["train", "no-such-problem"], 2, "unknown problem or oracle 'no-such-problem'",
        absent=("runs",)),
    Row("budget below what setup needs", ["train", "digits", *DIGITS_RUN, "--set", "run.query_budget=10"], 2,
        "run.query_budget=10 is too small for this job's setup: its 'prune' phase needs 18 queries",
        absent=("runs",)),
    # ---- environment
    Row("explicit device the problem cannot use", ["train", "digits", "--set", "run.device=cuda"], 2,
        "run.device='cuda': problem 'digits' runs on cpu only", absent=("runs",)),
    Row("run.device=cuda without CUDA", ["train", "cifar10", "--set", "run.device=cuda"], 2,
        "sees no CUDA device", absent=("runs",), skip_if=_cuda_present),
    Row("run.device=auto records what it chose", ["train", BOWL, *QUIET, "--set", "run.device=auto",
                                                   "--set", "run.epochs=1"], 0, "",
        exists=("runs/*/*/summary.json",), check=_config_says("run.device", "cpu"), err_lines=0),
    Row("unwritable run.out_dir", ["train", BOWL, "--set", "run.out_dir={tmp}/a-file/runs"], 2,
        "cannot create a run directory under", prepare=_file_under_a_file, absent=("a-file/*",)),
    Row("disk full while checkpointing (ENOSPC)", ["train", BOWL, *BOWL_RUN], 2,
        "No space left on device (errno 28); the run stopped and its last checkpoint is kept",
        patch=_enospc_on_second_checkpoint, exists=(f"runs/*/*/{rundir.CHECKPOINT_NAME}",),
        absent=("runs/*/*/.*.tmp*",), check=_summary_says(stopped="write error", checkpoint_step=5)),
    Row("file size limit (EFBIG, a real OS refusal)", ["train", BOWL, *BOWL_RUN], 2, "File too large (errno 27)",
        subprocess=True, exists=("runs/*/*/config.json",), absent=("runs/*/*/.*.tmp*",)),
    Row("missing optional extra (gymnasium)", ["train", "cartpole"], 2,
        "GymPolicyOracle needs gymnasium: pip install 'blackbox-zo[gym]'", patch=_no_module("gymnasium"),
        absent=("runs",)),
    Row("missing optional extra (phiflow)", ["train", "wake-flow", "--set", "wake.cache_dir={tmp}/cache", *QUIET], 2,
        "needs PhiFlow 3: pip install 'blackbox-zo[sim]'", patch=_no_module("phi"), absent=("runs",)),
    # ---- resume contract
    Row("resume with a changed model", ["train", "digits", "--resume", "{run}", "--set", "model.width=16"], 2,
        "model.width: 2 -> 16", prepare=_copy("digits"), check=_config_unchanged("digits")),
    Row("resume with a --config that changes a setting", ["train", "digits", "--resume", "{run}", "--config",
                                                          "{tmp}/lr.toml"], 2, "optimizer.lr: 0.1 -> 0.05",
        prepare=_lr_file, check=_config_unchanged("digits")),
    Row("resume with a --config of allowed changes", ["train", "digits", "--resume", "{run}", "--config",
                                                      "{tmp}/same.toml"], 0, "",
        prepare=_same_file, check=_config_says("run.max_steps", 3), err_lines=0),
    Row("resume as another problem", ["train", "cartpole", "--resume", "{run}"], 2,
        "is a run of problem 'digits', not 'cartpole'; resume it with: blackbox-zo train digits --resume",
        prepare=_copy("digits"), check=_config_unchanged("digits")),
    Row("resume a directory that is not a run", ["train", BOWL, "--resume", "{tmp}"], 2,
        "not a run directory (no config.json)"),
    Row("resume a run killed during setup", ["train", BOWL, "--resume", "{run}"], 0,
        "no checkpoint in", prepare=_config_only, exists=("run/summary.json",),
        check=_summary_says(stopped="completed", steps=20)),
    Row("resume a run with a damaged config.json", ["train", BOWL, "--resume", "{run}"], 2,
        "config.json is damaged", prepare=_damaged_config),
    # ---- damaged checkpoints
    Row("truncated checkpoint, no previous one: resume", ["train", BOWL, "--resume", "{run}"], 2,
        "checkpoint.pt is damaged (cannot be read", prepare=_truncate("bowl", keep_prev=False)),
    Row("truncated checkpoint, no previous one: eval", ["eval", "{run}"], 2,
        "checkpoint.pt is damaged (cannot be read", prepare=_truncate("bowl", keep_prev=False)),
    Row("corrupt checkpoint: resume falls back to the previous one", ["train", BOWL, "--resume", "{run}"], 0,
        "do not match their digest); using the previous one, checkpoint.prev.pt (step 20)",
        prepare=_flip_a_tensor_byte, exists=(f"run/{rundir.DAMAGED_CHECKPOINT_NAME}",),
        check=_summary_says(stopped="completed", steps=20)),
    Row("truncated checkpoint: eval falls back to the previous one", ["eval", "{run}"], 0,
        "using the previous one, checkpoint.prev.pt (step 20)", prepare=_truncate("bowl"),
        check=lambda tmp, out, err: json.loads(out)["checkpoint"] == "checkpoint.prev.pt" or pytest.fail(out)),
    Row("killed between the renames of a rotation", ["train", BOWL, "--resume", "{run}"], 0,
        "checkpoint.pt is missing", prepare=_only_prev, absent=("run/.*.tmp*",),
        check=_summary_says(stopped="completed", steps=20)),
    Row("eval of a directory that is not a run", ["eval", "{tmp}"], 2, "not a run directory (no config.json)"),
    # ---- the oracle
    Row("non-finite loss, nan_policy=stop", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.nan_after=9"], 1,
        "step 5 (epoch 0) of oracle 'fault-bowl-v1'", exists=("runs/*/*/checkpoint.pt",),
        check=_summary_says(stopped="non-finite", stop_step=5, steps=4, checkpoint_step=4)),
    # calls: steps 1-10 make calls 1-20 (base, coordinates), the evaluation after step 10 call 21, step 20 calls 40-41
    Row("non-finite loss, nan_policy=skip", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.nan_at=41",
                                             "--set", "run.nan_policy=skip"], 0, "skipping step 20 (epoch 1)",
        check=_summary_says(stopped="completed", skipped_steps=1, steps=20)),
    Row("non-finite evaluation, nan_policy=stop", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.nan_in_eval=true"],
        1, "evaluation after step 10 (oracle 'fault-bowl-v1')",
        check=_summary_says(stopped="non-finite", stop_step=10, checkpoint_step=10)),
    Row("non-finite evaluation, nan_policy=skip", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.nan_in_eval=true",
                                                   "--set", "run.nan_policy=skip"], 0,
        "step 10: evaluation skipped (run.nan_policy=skip)", err_lines=2,
        check=_summary_says(stopped="completed", steps=20, eval_loss=ABSENT)),
    Row("query budget reached mid-run", ["train", BOWL, *BOWL_RUN, "--set", "run.query_budget=33"], 0,
        "stopping: query budget 33", err_lines=2,
        check=_summary_says(stopped="query budget", steps=6)),
    Row("permanent oracle error", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.permanent_at=13"], 1,
        "oracle 'fault-bowl-v1' raised ValueError: the simulator crashed",
        check=_summary_says(stopped="oracle error", stop_step=7, checkpoint_step=6)),
    Row("transient errors within run.oracle_retries", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.transient=2",
                                                       "--set", "oracle.options.transient_from=6",
                                                       "--set", "run.oracle_retry_backoff_s=0"], 0, "",
        err_lines=0, check=_summary_says(stopped="completed", steps=20, queries_retried=8)),
    Row("transient errors beyond run.oracle_retries", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.transient=5",
                                                       "--set", "oracle.options.transient_from=5",
                                                       "--set", "run.oracle_retries=1",
                                                       "--set", "run.oracle_retry_backoff_s=0"], 1,
        "failed 2 time(s) in a row with a transient error (run.oracle_retries=1)",
        check=_summary_says(stopped="oracle error", stop_step=3, checkpoint_step=2)),
    Row("piecewise-constant loss: the zero-signal guard", ["train", BOWL, *BOWL_RUN, "--set", "oracle.options.quantum=0.1"],
        0, "every finite difference of step 1 was exactly 0", err_lines=1,
        check=lambda tmp, out, err: "raise estimator.mu" in err and "estimator=rge" in err
        and len(summary_of(only_run(tmp))["warnings"]) == 1 or pytest.fail(err)),
    # ---- check-oracle
    Row("check-oracle: loss flat at the configured mu", ["check-oracle", BOWL, "--set", "oracle.options.quantum=0.1"],
        1, "[FAIL] loss changes at mu=0.005: none of 4 coordinates changes the loss", stream="out", err_lines=0),
    Row("check-oracle: the check at a larger mu passes", ["check-oracle", BOWL, "--set", "oracle.options.quantum=0.1",
                                                          "--set", "estimator.mu=0.5"],
        0, "[PASS] loss changes at mu=0.5", stream="out", err_lines=0),
    Row("check-oracle: non-deterministic oracle, reported once", ["check-oracle", BOWL, "--set",
                                                                  "oracle.options.noise=0.1"], 1,
        "[FAIL] deterministic: max difference", stream="out", err_lines=0,
        check=lambda tmp, out, err: out.count("[FAIL]") == 1 and out.count("[SKIP]") == 2 or pytest.fail(out)),
    Row("check-oracle: a setting it does not take", ["check-oracle", BOWL, "--set", "run.epochs=3"], 2,
        "check-oracle --set takes oracle.options.KEY=VALUE and estimator.mu=VALUE, got run.epochs"),
    Row("check-oracle: a bad factory option", ["check-oracle", BOWL, "--set", "oracle.options.nope=1"], 1,
        "[FAIL] construct fault-bowl-v1 with oracle.options={'nope': 1}", stream="out", err_lines=0),
    Row("check-oracle: unknown oracle", ["check-oracle", "no-such-oracle"], 2, "unknown oracle 'no-such-oracle'"),
    Row("check-oracle: a plug-in that fails to import", ["check-oracle", "broken-v1"], 2,
        "plug-in 'broken-v1' (blackbox_zo.oracles) failed to import: ModuleNotFoundError: No module named "
        "'no_such_module_xyz'", patch=_broken_plugin),
    Row("train: a plug-in that fails to import", ["train", "broken-v1"], 2,
        "plug-in 'broken-v1' (blackbox_zo.oracles) failed to import: ModuleNotFoundError", patch=_broken_plugin,
        absent=("runs",)),
]


PREPARED: dict[str, Path] = {}


def _run_in_subprocess(row: Row, argv: list[str], tmp: Path) -> tuple[int, str, str]:
    def limit_file_size():  # CPython ignores SIGXFSZ, so an oversized write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = subprocess.run([sys.executable, str(TESTS / "fault_oracles.py"), *argv], cwd=tmp, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=limit_file_size if "EFBIG" in row.case else None)
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.case)
def test_fault(row: Row, prepared, tmp_path, capsys, monkeypatch):
    if row.skip_if is not None and (why := row.skip_if()):
        pytest.skip(why)
    PREPARED.update(prepared)
    monkeypatch.chdir(tmp_path)
    if row.prepare is not None:
        row.prepare(tmp_path, prepared)
    argv = [a.format(tmp=tmp_path, run=tmp_path / "run") for a in row.argv]
    if argv[0] == "train" and "--resume" not in argv and not any(a.startswith("run.out_dir=") for a in argv):
        argv += ["--set", "run.out_dir=runs"]
    if row.subprocess:
        code, out, err = _run_in_subprocess(row, argv, tmp_path)
    else:
        if row.patch is not None:
            row.patch(monkeypatch, tmp_path)
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == row.code, (code, out, err)
    text = out if row.stream == "out" else err
    assert row.message in text, (row.message, text)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= row.err_lines, lines
    for pattern in row.exists:
        assert list(tmp_path.glob(pattern)), f"{pattern} should exist: {sorted(p.name for p in tmp_path.rglob('*'))}"
    for pattern in row.absent:
        assert not list(tmp_path.glob(pattern)), f"{pattern} should not exist"
    if row.check is not None:
        row.check(tmp_path, out, err)


# ---------------------------------------------------------------------------- signals


def _start(tmp: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "fault_oracles.py"), *argv], cwd=tmp, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out: {proc.communicate()}")


def _metric_lines(tmp: Path) -> int:
    files = list(tmp.glob(f"runs/{BOWL}/*/metrics.jsonl"))
    return len(files[0].read_text().splitlines()) if files else 0


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode, out, err


SLOW_BOWL = ["train", BOWL, "--set", "run.out_dir=runs", *QUIET, "--set", "run.checkpoint_every_steps=1",
             "--set", "run.epochs=2"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_training_checkpoints_and_resumes(tmp_path, sig):
    proc = _start(tmp_path, *SLOW_BOWL, "--set", "oracle.options.sleep_s=0.03")
    _wait_for(lambda: _metric_lines(tmp_path) >= 3, proc)
    proc.send_signal(sig)
    code, out, err = _finish(proc)
    assert code == 128 + sig, err
    (line,) = err.strip().splitlines()
    run = only_run(tmp_path)
    s = summary_of(run)
    step = s["steps"]
    assert s["stopped"] == "interrupted" and s["signal"] == sig.name and s["checkpoint_step"] == step
    assert f"interrupted by {sig.name} after step {step}; checkpoint of step {step} in runs/{BOWL}/" in line
    assert line.endswith(f"resume with: blackbox-zo train {BOWL} --resume runs/{BOWL}/{run.name}")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == step  # the step in the message is metrics.jsonl's
    assert torch.load(run / rundir.CHECKPOINT_NAME, weights_only=True)["position"][2] == step
    # the command it printed resumes the run to the end (in this process, where the bowl is registered too)
    os.chdir(tmp_path)
    try:
        assert main(line.split("resume with: blackbox-zo ")[1].split()) == 0
    finally:
        os.chdir(TESTS.parent)
    s = summary_of(run)
    assert s["stopped"] == "completed" and s["steps"] == 20
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 21))  # each step once: the lines after the checkpoint were not duplicated


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    proc = _start(tmp_path, *SLOW_BOWL, "--set", "oracle.options.sleep_s=2.0")  # a step takes 4 s
    _wait_for(lambda: _metric_lines(tmp_path) >= 1, proc)  # step 1 just ended: step 2 has ~4 s to go
    time.sleep(0.5)  # into step 2 (a signal before it starts would stop before it, gracefully)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.2)
    # the handler of the first signal ran at once (the process sleeps in the oracle, and a sleep is
    # interrupted by a signal), so this one is 1.2 s after it: a repeat, which stops at once
    proc.send_signal(signal.SIGINT)
    code, out, err = _finish(proc)
    assert code == 130
    (line,) = err.strip().splitlines()
    assert "interrupted by SIGINT during step 2; checkpoint of step 1 in" in line and "resume with:" in line
    s = summary_of(only_run(tmp_path))
    assert s["stopped"] == "interrupted" and s["checkpoint_step"] == 1


@pytest.mark.parametrize("what", ["train setup", "eval setup", "check-oracle", "experiment"])
def test_a_signal_outside_training_is_one_line(tmp_path, prepared, what):
    if what == "train setup":
        argv = [*SLOW_BOWL, "--set", "oracle.options.setup_sleep_s=60"]
        marker = "setup.started"
    elif what == "eval setup":
        run = copy_run(prepared["bowl"], tmp_path)
        cfg = json.loads((run / "config.json").read_text())
        cfg["oracle"]["options"]["setup_sleep_s"] = 60
        (run / "config.json").write_text(json.dumps(cfg))
        argv, marker = ["eval", str(run)], "setup.started"
    elif what == "check-oracle":
        argv, marker = ["check-oracle", BOWL, "--set", "oracle.options.setup_sleep_s=60"], "setup.started"
    else:
        argv, marker = ["experiment", "fault-sleep", "60"], "experiment.started"
    proc = _start(tmp_path, *argv)
    _wait_for(lambda: (tmp_path / marker).exists(), proc)
    time.sleep(0.2)  # into the sleep
    proc.send_signal(signal.SIGTERM if what == "eval setup" else signal.SIGINT)
    code, out, err = _finish(proc)
    (line,) = err.strip().splitlines()
    if what == "eval setup":
        assert code == 143 and line == "blackbox-zo: interrupted by SIGTERM"
    elif what == "train setup":
        assert code == 130 and line == "blackbox-zo: interrupted by SIGINT during setup (nothing was kept)"
        assert not (tmp_path / "runs").exists()  # nothing half made
    else:
        assert code == 130 and line == "blackbox-zo: interrupted by SIGINT"


def test_the_table_covers_every_case_of_the_issue():
    """Issue 13's list, by the row (or test) that covers it: a row removed is a case lost."""
    cases = {r.case for r in ROWS}
    for needed in ("resume with a changed model", "resume with a --config that changes a setting",
                   "resume as another problem", "truncated checkpoint, no previous one: resume",
                   "truncated checkpoint, no previous one: eval", "unwritable run.out_dir",
                   "run.device=cuda without CUDA", "non-finite evaluation, nan_policy=skip",
                   "non-finite loss, nan_policy=stop", "budget below what setup needs",
                   "piecewise-constant loss: the zero-signal guard", "check-oracle: non-deterministic oracle, reported once",
                   "disk full while checkpointing (ENOSPC)", "missing optional extra (phiflow)",
                   "transient errors beyond run.oracle_retries", "check-oracle: a plug-in that fails to import"):
        assert needed in cases, needed
    assert len(ROWS) >= 40


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_under_two_ranks_a_signal_to_one_rank_stops_both_before_the_same_step(tmp_path):
    """torchrun's workers, started by hand: SIGTERM reaches rank 1 only; the per-step agreement
    (one all-reduce of the signal number) stops rank 0 before the same step, so neither waits
    forever in a collective the other never joins, and the main rank checkpoints that step."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "fault_oracles.py"), *SLOW_BOWL,
                                       "--set", "oracle.options.sleep_s=0.05", "--set", "parallel.timeout_s=60"],
                                      cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    _wait_for(lambda: _metric_lines(tmp_path) >= 3, procs[0], timeout=120)
    procs[1].send_signal(signal.SIGTERM)
    results = [_finish(p) for p in procs]
    assert [r[0] for r in results] == [143, 143], results
    assert results[1][2].strip() == ""  # only the main rank speaks
    (line,) = results[0][2].strip().splitlines()
    run = only_run(tmp_path)
    s = summary_of(run)
    step = s["steps"]
    assert s["stopped"] == "interrupted" and s["signal"] == "SIGTERM" and s["checkpoint_step"] == step
    assert f"interrupted by SIGTERM after step {step}" in line
    assert "resume with: torchrun --nproc-per-node 2 -m blackbox_zo train fault-bowl-v1 --resume" in line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == step
    assert torch.load(run / rundir.CHECKPOINT_NAME, weights_only=True)["position"][2] == step


def test_docs_reliability_lists_every_row():
    """docs/reliability.md prints this table: a row added here must be documented there."""
    doc = (TESTS.parent / "docs" / "reliability.md").read_text()
    missing = [r.case for r in ROWS if f"| {r.case} |" not in doc]
    assert not missing, missing
