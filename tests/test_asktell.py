"""Ask/tell (blackbox_zo/asktell.py): a run driven from outside, step by step, ends bitwise where the
same run driven in-process ends; bad input is one line and changes nothing; a run resumes anywhere."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blackbox_zo import rundir
from blackbox_zo.asktell import AskTellError, AskTellRun, ExternalProblem, RunComplete, read_answer, write_points
from blackbox_zo.cli import main
from blackbox_zo.config import resolve_config
from blackbox_zo.plots import read_metrics
from blackbox_zo.trainer import train

DIM = 6
CENTER = torch.linspace(-1.0, 1.0, DIM)
SCALES = torch.linspace(1.0, 4.0, DIM)


def black_box(points: torch.Tensor) -> torch.Tensor:
    """A shifted ellipsoid, row by row (a row's loss does not depend on the other rows of its call)."""
    return torch.stack([((row - CENTER) ** 2 * SCALES).sum() for row in points])


METHODS = {
    "es": {"estimator": {"kind": "es", "q": 3, "mu": 0.05}, "optimizer": {"name": "adam", "lr": 0.1}},
    "sep-cma-es": {"estimator": {"kind": "sep-cma-es", "mu": 0.3, "popsize": 6}},
    "cma-es": {"estimator": {"kind": "cma-es", "mu": 0.3}},
    "cge": {"estimator": {"kind": "cge", "mu": 1e-3, "scheme": "central"}, "optimizer": {"name": "sgd", "lr": 0.05}},
    "rge": {"estimator": {"kind": "rge", "q": 4, "mu": 1e-3}, "optimizer": {"name": "sgd", "lr": 0.02}},
}


def _config(method: str, epochs: int = 3, steps: int = 4, **run):
    problem = ExternalProblem()
    settings = rundir_merge(problem.default_config(), METHODS[method])
    settings["external"] = {"dim": DIM, "steps_per_epoch": steps}
    settings["run"] = {"epochs": epochs, "progress": False, **run}
    return resolve_config(problem.config_model, settings)


def rundir_merge(base, update):
    from blackbox_zo.config import deep_merge

    return deep_merge(base, update)


def _drive(run_dir: Path, config, fresh_process_every_step: bool = True) -> dict:
    """Drive a whole run by ask/tell: a new AskTellRun per step (as separate `blackbox-zo` calls would)."""
    run = AskTellRun.create(ExternalProblem(), config, run_dir)
    last = None
    while True:
        if fresh_process_every_step:
            run = AskTellRun.open(run_dir, problem=ExternalProblem())
        try:
            ask = run.ask()
        except RunComplete as done:
            return done.summary if last is None or "summary" not in last else last["summary"]
        if fresh_process_every_step:  # the answer arrives in yet another process
            run = AskTellRun.open(run_dir, problem=ExternalProblem())
        last = run.tell(ask.id, black_box(ask.points).numpy())
        if "summary" in last:
            return last["summary"]


def _params(run_dir: Path) -> torch.Tensor:
    state = torch.load(run_dir / rundir.CHECKPOINT_NAME, weights_only=True)
    return torch.cat([v.reshape(-1) for v in state["module"].values()])


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_driven_by_ask_tell_equals_the_run_in_process(tmp_path, method):
    config = _config(method)
    summary_in = train(ExternalProblem(evaluate=black_box), config, tmp_path / "in-process")
    summary_at = _drive(tmp_path / "ask-tell", config)
    a, b = _params(tmp_path / "in-process"), _params(tmp_path / "ask-tell")
    assert torch.equal(a, b), (a - b).abs().max()
    assert _losses(tmp_path / "in-process") == _losses(tmp_path / "ask-tell")
    assert summary_in["steps"] == summary_at["steps"] == 12 and summary_in["queries"] == summary_at["queries"]
    # and it learned something (the losses are the black box's, not a placeholder)
    losses = _losses(tmp_path / "ask-tell")
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert not (tmp_path / "ask-tell" / "ask.json").exists()
    if method in ("sep-cma-es", "cma-es"):  # the search's state checkpoints as plain tensors and numbers
        state = torch.load(tmp_path / "ask-tell" / rundir.CHECKPOINT_NAME, weights_only=True)
        assert state["estimator"]["generation"] == 12


def test_one_process_and_a_process_per_command_agree(tmp_path):
    config = _config("sep-cma-es")
    _drive(tmp_path / "one", config, fresh_process_every_step=False)
    _drive(tmp_path / "many", config)
    assert torch.equal(_params(tmp_path / "one"), _params(tmp_path / "many"))


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_bad_answers_are_refused_and_change_nothing(tmp_path):
    run_dir = tmp_path / "run"
    AskTellRun.create(ExternalProblem(), _config("es"), run_dir)
    run = AskTellRun.open(run_dir, problem=ExternalProblem())
    ask = run.ask()
    assert run.ask().id == ask.id  # asking again is the same ask
    good = black_box(ask.points).numpy()
    before = _snapshot(run_dir)
    nan = good.copy()
    nan[2] = np.nan
    cases = [
        (ask.id, good[:-1], "needs 6 loss values"),
        (ask.id, np.concatenate([good, good]), "needs 6 loss values"),
        (ask.id, nan, "NaN or infinite (rows 2)"),
        (ask.id, np.array(["a"] * 6), "must be numbers"),
        (None, good, "which ask"),
        ("000009-deadbeef", good, "is not the pending ask"),
    ]
    for ask_id, losses, message in cases:
        with pytest.raises(AskTellError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            AskTellRun.open(run_dir, problem=ExternalProblem()).tell(ask_id, losses)
        assert "\n" not in str(err.value)
        assert _snapshot(run_dir) == before
    record = AskTellRun.open(run_dir, problem=ExternalProblem()).tell(ask.id, good)
    assert record["step"] == 1
    # the answer to an ask already told is stale: refused, nothing changed
    after = _snapshot(run_dir)
    with pytest.raises(AskTellError, match="no ask is pending"):
        AskTellRun.open(run_dir, problem=ExternalProblem()).tell(ask.id, good)
    run = AskTellRun.open(run_dir, problem=ExternalProblem())
    second = run.ask()
    assert second.id != ask.id and second.step == 2
    with pytest.raises(AskTellError, match="is stale: step 1 was already told"):
        AskTellRun.open(run_dir, problem=ExternalProblem()).tell(ask.id, good)
    assert _snapshot(run_dir).keys() == after.keys() | {"ask.json"}


def test_a_kill_between_checkpoint_and_clearing_the_ask_is_not_applied_twice(tmp_path):
    # tell checkpoints step k, then removes ask.json: a process killed in between leaves the ask of
    # step k on disk. Answering it again must be refused (stale), and the next ask is step k + 1.
    run_dir = tmp_path / "run"
    AskTellRun.create(ExternalProblem(), _config("sep-cma-es"), run_dir)
    run = AskTellRun.open(run_dir, problem=ExternalProblem())
    ask = run.ask()
    pending = (run_dir / "ask.json").read_bytes()
    run.tell(ask.id, black_box(ask.points).numpy())
    (run_dir / "ask.json").write_bytes(pending)  # as if killed before the unlink
    params = _params(run_dir)
    with pytest.raises(AskTellError, match="stale"):
        AskTellRun.open(run_dir, problem=ExternalProblem()).tell(ask.id, black_box(ask.points).numpy())
    assert torch.equal(_params(run_dir), params)
    nxt = AskTellRun.open(run_dir, problem=ExternalProblem()).ask()
    assert nxt.step == 2


def test_points_file_round_trip_and_wrong_files(tmp_path):
    run_dir = tmp_path / "run"
    run = AskTellRun.create(ExternalProblem(), _config("es"), run_dir)
    ask = run.ask()
    path = write_points(ask, tmp_path / "points.npz")
    with np.load(path, allow_pickle=False) as f:
        assert np.array_equal(f["points"], ask.points.numpy()) and str(f["ask_id"]) == ask.id
        assert int(f["step"]) == 1
    with pytest.raises(AskTellError, match="must name a .npz"):
        write_points(ask, tmp_path / "points.txt")
    np.savez(tmp_path / "answer.npz", losses=np.ones(6), ask_id=np.array(ask.id))
    losses, ask_id = read_answer(tmp_path / "answer.npz")
    assert ask_id == ask.id and losses.shape == (6,)
    with pytest.raises(AskTellError, match="but --ask-id says"):
        read_answer(tmp_path / "answer.npz", "000001-other")
    np.savez(tmp_path / "wrong.npz", values=np.ones(6))
    with pytest.raises(AskTellError, match="an answer needs 'losses'"):
        read_answer(tmp_path / "wrong.npz")
    (tmp_path / "garbage.npy").write_text("not numpy")
    with pytest.raises(AskTellError, match="cannot read"):
        read_answer(tmp_path / "garbage.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(AskTellError, match="cannot read"):  # never unpickled
        read_answer(tmp_path / "objects.npy")
    with pytest.raises(AskTellError, match="not found"):
        read_answer(tmp_path / "missing.npy")


def test_create_refuses_a_used_directory_and_a_bad_x0(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(AskTellError, match="not empty"):
        AskTellRun.create(ExternalProblem(), _config("es"), tmp_path / "used")
    with pytest.raises(AskTellError, match="x0 must hold 6 finite numbers"):
        AskTellRun.create(ExternalProblem(), _config("es"), tmp_path / "bad", x0=np.ones(5))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    run = AskTellRun.create(ExternalProblem(), _config("es"), tmp_path / "x0", x0=np.arange(6.0))
    assert torch.equal(_params(tmp_path / "x0"), torch.arange(6.0))
    assert run.trainer.space.dim == DIM


def test_the_cli_drives_a_whole_run_by_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    x0 = tmp_path / "x0.npy"
    np.save(x0, np.zeros(DIM))
    assert main(["init-ask", "external", "--out", str(run_dir), "--x0", str(x0), "--set", f"external.dim={DIM}",
                 "--set", "external.steps_per_epoch=2", "--set", "run.epochs=2", "--set", "estimator=sep-cma-es",
                 "--set", "estimator.mu=0.3", "--set", "run.progress=false"]) == 0
    assert "created" in capsys.readouterr().out
    points, answer = tmp_path / "points.npz", tmp_path / "losses.npy"
    told = 0
    while True:
        code = main(["ask", str(run_dir), "--out", str(points)])
        if code == 3:
            assert "complete" in capsys.readouterr().err
            break
        assert code == 0
        with np.load(points, allow_pickle=False) as f:
            pts, ask_id = torch.from_numpy(f["points"]), str(f["ask_id"])
        np.save(answer, black_box(pts).numpy()[:-1])  # a wrong count first: exit 2, one line
        assert main(["tell", str(run_dir), str(answer), "--ask-id", ask_id]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "loss values" in err
        np.save(answer, black_box(pts).numpy())
        assert main(["tell", str(run_dir), str(answer)]) == 2  # no id: which ask?
        assert "--ask-id" in capsys.readouterr().err
        assert main(["tell", str(run_dir), str(answer), "--ask-id", ask_id]) == 0
        told += 1
        capsys.readouterr()
    assert told == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "completed"
    assert main(["tell", str(run_dir), str(answer), "--ask-id", ask_id]) == 2
    assert "complete" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "nowhere"), "--out", str(points)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_query_budget_ends_an_ask_tell_run(tmp_path):
    config = _config("sep-cma-es", query_budget=20)  # popsize 6: three steps fit, the fourth does not
    run_dir = tmp_path / "run"
    summary = _drive(run_dir, config)
    assert summary["stopped"] == "query budget" and summary["queries"]["total"] == 18 and summary["steps"] == 3
    with pytest.raises(RunComplete):
        AskTellRun.open(run_dir, problem=ExternalProblem()).ask()
