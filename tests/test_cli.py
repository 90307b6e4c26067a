import json
import subprocess
import sys

import pytest

from blackbox_zo.cli import main
from blackbox_zo.config import ConfigError, load_config_file, parse_overrides

FAST = ["--set", "model.width=2", "--set", "estimator=rge", "--set", "estimator.q=8", "--set", "run.epochs=1",
        "--set", "run.max_steps=3", "--set", "run.progress=false"]


@pytest.mark.parametrize("override,message", [
    ("estimator.mu=-1", "estimator.mu: Input should be greater than 0"),
    ("estimator.kind=magic", "estimator.kind: Input should be 'cge', 'rge', 'linear-interpolation', 'es', 'guided-es', 'sep-cma-es', "
                            "'cma-es', 'subspace-cge' or 'autograd'"),
    ("optimizer.momentum=1.5", "optimizer.momentum: Input should be less than 1"),
    ("optimizer.lr=0", "optimizer.lr: Input should be greater than 0"),
    ("data.batch_size=0", "data.batch_size: Input should be greater than or equal to 1"),
    ("run.epochs=0", "run.epochs: Input should be greater than or equal to 1"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio: Input should be less than or equal to 1"),
    ("run.nan_policy=ignore", "run.nan_policy: Input should be 'stop' or 'skip'"),
    ("estimator.typo=1", "estimator.typo: Extra inputs are not permitted"),
    ("optimizer", "--set expects key.path=value"),
])
def test_each_invalid_field_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, override, message):
    code = main(["train", "digits", "--set", f"run.out_dir={tmp_path}", "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_config_file_toml_and_json(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[optimizer]\nlr = 0.05\n[estimator]\nkind = 'rge'\nq = 4\n")
    (tmp_path / "c.json").write_text(json.dumps({"optimizer": {"lr": 0.05}}))
    assert load_config_file(tmp_path / "c.toml")["estimator"]["q"] == 4
    assert load_config_file(tmp_path / "c.json") == {"optimizer": {"lr": 0.05}}
    (tmp_path / "bad.toml").write_text("[optimizer\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(tmp_path / "bad.toml")
    assert parse_overrides(["estimator=rge", "estimator.q=4"]) == {"estimator": {"kind": "rge", "q": 4}}
    assert main(["train", "digits", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_train_eval_list_end_to_end(tmp_path, capsys):
    assert main(["train", "digits", "--set", f"run.out_dir={tmp_path}", *FAST]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith("digits: ") and "test_acc=" in final and "queries 27" in final  # 3 steps x (8 + 1)
    (run_dir,) = (tmp_path / "digits").iterdir()
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert evaluated["test_acc"] == summary["test_acc"] and evaluated["step"] == 3
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "model-loss-v1" in out and "digits" in out
    assert main(["check-oracle", "no-such-oracle"]) == 2
    assert main(["eval", str(tmp_path)]) == 2


def test_console_script_help_runs_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "blackbox_zo", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--set" in out.stdout
