"""`blackbox-zo compare`: the table equals the runs' summaries, labels name what differs, refusals are one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import fault_oracles  # noqa: F401  (registers fault-bowl-v1)
from blackbox_zo import cli
from blackbox_zo.problem import get_problem
from blackbox_zo.trainer import train

BOWL = fault_oracles.NAME
BASE = ["oracle.steps_per_epoch=3", "run.epochs=3", "run.progress=false", "schedule=constant"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs: CGE at two learning rates, and RGE with q=2."""
    root = tmp_path_factory.mktemp("runs")
    problem = get_problem(BOWL)
    out = {}
    for name, overrides in {"cge-lr0.1": ["optimizer.lr=0.1"], "cge-lr0.3": ["optimizer.lr=0.3"],
                            "rge": ["optimizer.lr=0.1", "estimator=rge", "estimator.q=2"]}.items():
        cfg = problem.resolve_config(overrides=[*BASE, *overrides])
        train(problem, cfg, run_dir=root / name)
        out[name] = root / name
    return out


def compare(capsys, *argv):
    code = cli.main(["compare", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_the_table_equals_the_summaries_and_the_labels_name_what_differs(runs, tmp_path, capsys):
    target = 1.0
    code, out, err = compare(capsys, *runs.values(), "--target", target, "--out", tmp_path / "cmp")
    assert code == 0, err
    rows = {Path(r["run"]).name: r for r in read_csv(tmp_path / "cmp" / "compare.csv")}
    assert sorted(rows) == sorted(runs)
    for name, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        row = rows[name]
        assert row["metric"] == "eval_loss"  # the headline metric of a bare oracle
        assert float(row["final"]) == summary["eval_loss"]
        assert int(row["queries"]) == summary["queries"]["total"] and float(row["wall_s"]) == summary["wall_s"]
        assert int(row["steps"]) == summary["steps"] == 9 and row["stopped"] == "completed"
        evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        first = next((r["queries"] for r in evals if r.get("eval/eval_loss", float("inf")) <= target), None)
        assert row["queries_to_target"] == ("" if first is None else str(first))
    # labels: the settings that differ (lr, the estimator), and only those
    assert rows["cge-lr0.1"]["label"] == "estimator.kind=cge, optimizer.lr=0.1"
    assert rows["cge-lr0.3"]["label"] == "estimator.kind=cge, optimizer.lr=0.3"
    assert rows["rge"]["label"] == "estimator.distribution=gaussian, estimator.kind=rge, estimator.q=2, optimizer.lr=0.1"
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md == out.split("\nwritten: ")[0]  # printed as written
    assert "| cge-lr0.3 | estimator.kind=cge, optimizer.lr=0.3 | completed | 9 |" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_fall_back_to_the_directory_when_nothing_differs(runs, tmp_path, capsys):
    copy = tmp_path / "again"
    shutil.copytree(runs["cge-lr0.1"], copy)
    code, out, err = compare(capsys, runs["cge-lr0.1"], copy, "--metric", "loss", "--out", tmp_path / "cmp")
    assert code == 0, err
    rows = read_csv(tmp_path / "cmp" / "compare.csv")
    assert [r["label"] for r in rows] == ["cge-lr0.1", "again"] and {r["metric"] for r in rows} == {"loss"}
    last_loss = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert float(rows[1]["final"]) == last_loss["loss"]


def test_runs_of_different_problems_are_refused_unless_forced(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs["rge"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "problem": "cartpole"}))
    code, out, err = compare(capsys, runs["cge-lr0.1"], other, "--out", tmp_path / "cmp")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "runs of different problems" in err and "--force" in err and not (tmp_path / "cmp").exists()
    code, out, err = compare(capsys, runs["cge-lr0.1"], other, "--force", "--out", tmp_path / "cmp")
    assert code == 0 and len(read_csv(tmp_path / "cmp" / "compare.csv")) == 2


@pytest.mark.parametrize("damage", ["missing", "not a run", "no metrics"])
def test_a_bad_run_directory_is_one_line_and_exit_2(runs, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    if damage == "not a run":
        bad.mkdir()
    elif damage == "no metrics":
        shutil.copytree(runs["rge"], bad)
        (bad / "metrics.jsonl").unlink()
    code, out, err = compare(capsys, runs["rge"], bad, "--out", tmp_path / "cmp")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err, err
    assert not (tmp_path / "cmp").exists()


def test_the_default_output_directory_is_under_runs_and_printed(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = compare(capsys, *runs.values())
    assert code == 0, err
    made = list((tmp_path / "runs" / "compare").iterdir())
    assert len(made) == 1 and f"written: {Path('runs') / 'compare' / made[0].name / 'compare.md'}" in out
