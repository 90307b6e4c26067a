"""An out-of-tree package adds an oracle through the entry-point group `blackbox_zo.oracles`.

The package is the one in docs/oracles.md (its pyproject.toml and module, taken from the
guide). It is installed into a temporary site directory the way pip lays it out — the
package next to a `<name>-<version>.dist-info` holding METADATA and the entry_points.txt
generated from the package's own pyproject.toml — and that directory is put on the
path, so `importlib.metadata` discovers it exactly as it discovers an installed
distribution (fast, no network, nothing left behind). The opt-in slow test checks this
layout against a real `pip install --target` of the same package.

The guide's own commands run on it: `blackbox-zo list` and `check-oracle` in this process,
`train` in a fresh interpreter, so the real entry-point discovery is exercised end to end.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from test_docs_oracles import guide_blocks, plugin_files

ROOT = Path(__file__).resolve().parents[1]

# A second package, not from the guide: an oracle that breaks the CRN contract and an
# entry point that cannot be imported, to show that the checks can fail.
BROKEN_PYPROJECT = """
[project]
name = "broken-sims"
version = "0.0.1"

[project.entry-points."blackbox_zo.oracles"]
flaky-sim-v1 = "broken_sims:Flaky"
missing-sim-v1 = "broken_sims.nowhere:Missing"
"""
BROKEN_MODULE = '''
import torch
from blackbox_zo.oracle import Oracle, ParamSpace


class Flaky(Oracle):
    """Fresh noise on every call: finite differences of it are noise."""

    name = "flaky-sim-v1"
    space = ParamSpace([("x", (3,))])

    def losses(self, thetas, batch):
        return (thetas**2).sum(1) + 0.1 * torch.randn(thetas.shape[0])

    def example_batch(self):
        return None
'''


def install_like_pip(source: Path, site: Path) -> Path:
    """Lay out `source` (pyproject.toml + one top-level package) in `site` as pip would; returns the dist-info."""
    meta = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    name, version = meta["name"], meta["version"]
    package = next(p for p in source.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    (site / package.name).mkdir(parents=True)
    for f in package.iterdir():
        (site / package.name / f.name).write_text(f.read_text())
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = meta.get("entry-points", {})
    (dist_info / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))
    (dist_info / "top_level.txt").write_text(package.name + "\n")
    (dist_info / "INSTALLER").write_text("blackbox-zo-tests\n")
    return dist_info


def write_package(root: Path, pyproject: str, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(pyproject)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("plugins")
    guide = plugin_files()
    good = write_package(base / "my-zo-sims", guide.pop("pyproject.toml"), guide)
    broken = write_package(base / "broken-sims", BROKEN_PYPROJECT, {"broken_sims/__init__.py": BROKEN_MODULE})
    site = base / "site"
    install_like_pip(good, site)
    install_like_pip(broken, site)
    return site


def run_cli(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    # Run outside the repository so only installed metadata (and the plug-in's) is seen.
    return subprocess.run([sys.executable, "-m", "blackbox_zo", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def guide_commands() -> list[list[str]]:
    (block,) = [b for b in guide_blocks() if b.marker == "plugin-commands"]
    lines = [line.split("#")[0].strip() for line in block.code.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("blackbox-zo ")]


@pytest.fixture
def plugin_on_path(site, monkeypatch):
    """In-process discovery of the plug-ins, with the registries restored afterwards."""
    import importlib

    from blackbox_zo.oracle import ORACLES

    monkeypatch.syspath_prepend(str(site))
    for attr in ("_entries", "_origins", "errors", "_seen_entry_points"):  # the registry as it was, afterwards
        monkeypatch.setattr(ORACLES, attr, type(getattr(ORACLES, attr))(getattr(ORACLES, attr)))
    importlib.invalidate_caches()
    yield ORACLES
    for module in ("my_zo_sims", "broken_sims"):
        sys.modules.pop(module, None)


def test_the_guides_list_and_check_oracle_commands(plugin_on_path, capsys):
    from blackbox_zo.cli import main

    listed, checked, _ = guide_commands()
    assert (listed, checked) == (["list"], ["check-oracle", "bowl-sim-v1"])
    assert main(listed) == 0
    out = capsys.readouterr().out
    oracles_section = out.split("problems:")[0]
    assert "bowl-sim-v1" in oracles_section and "A shifted bowl" in oracles_section
    assert "gym-policy-v1" in oracles_section  # the repository's own entry points are still there
    assert "blackbox_zo.oracles:missing-sim-v1" in out.split("failed to load:")[1]

    assert main(checked) == 0
    out = capsys.readouterr().out
    assert out.count("[PASS]") == 9 and "[FAIL]" not in out and out.rstrip().endswith("OK")
    assert "[PASS] loss changes at mu=0.005: 4 of 4 coordinates change the loss" in out


def test_the_guides_train_command_in_a_fresh_interpreter(site, tmp_path):
    """The real thing: a new process, entry points found by importlib.metadata from sys.path."""
    *_, trained = guide_commands()
    assert trained[:2] == ["train", "bowl-sim-v1"]
    runs = tmp_path / "runs"
    out = run_cli([*trained, "--set", f"run.out_dir={runs}", "--set", "run.progress=false"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("bowl-sim-v1: eval_loss=")
    (run_dir,) = (runs / "bowl-sim-v1").iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    # The plug-in's losses come through: at theta = 0 the bowl is dim * target^2 = 8 * 1.5^2 = 18,
    # exact in float32; the CLI's options reached the factory (dim = 8 -> 9 queries per forward-CGE step).
    assert records[0]["loss"] == 18.0 and records[0]["step_queries"] == 9
    assert summary["queries"]["train"] == 3 * 10 * 9 and summary["queries"]["eval"] == 3
    # Training by queries only works on it: the loss at the end is a small fraction of 18.
    assert summary["eval_loss"] < 0.05 * 18.0, summary
    assert json.loads((run_dir / "config.json").read_text())["oracle"]["options"] == {"dim": 8}


def test_a_contract_breaking_plugin_fails_check_oracle(plugin_on_path, capsys):
    from blackbox_zo.cli import main

    assert main(["check-oracle", "flaky-sim-v1"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] deterministic: max difference" in out and out.rstrip().endswith("FAILED")
    assert out.count("[FAIL]") == 1  # reported once: the checks that compare two calls are skipped, not failed
    assert "[SKIP] coordinate_losses agrees with losses: not checked: the oracle is not deterministic" in out
    assert main(["check-oracle", "missing-sim-v1"]) == 2  # failed to load: its import error, not "unknown"
    err = capsys.readouterr().err.strip()
    assert "plug-in 'missing-sim-v1'" in err and "failed to import: ModuleNotFoundError" in err
    assert "broken_sims.nowhere" in err and len(err.splitlines()) == 1
    assert "ModuleNotFoundError" in plugin_on_path.errors["missing-sim-v1"]


def test_train_oracle_directly_in_process_and_eval_the_run(plugin_on_path, tmp_path, capsys):
    """`train NAME` for an oracle without a problem, then `eval RUN_DIR` reproduces its evaluation."""
    from blackbox_zo.cli import main

    args = ["train", "bowl-sim-v1", "--set", f"run.out_dir={tmp_path}", "--set", "run.progress=false",
            "--set", "oracle.options.target=-2", "--set", "run.epochs=1", "--set", "oracle.steps_per_epoch=4"]
    assert main(args) == 0
    capsys.readouterr()
    (run_dir,) = (tmp_path / "bowl-sim-v1").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["eval_loss"] == summary["eval_loss"] and evaluated["step"] == 4
    # A bad option names the factory's complaint, not a traceback.
    runs_before = sorted((tmp_path / "bowl-sim-v1").iterdir())
    assert main(["train", "bowl-sim-v1", "--set", f"run.out_dir={tmp_path}", "--set", "oracle.options.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "oracle.options={'nope': 1}" in err and "unexpected keyword argument 'nope'" in err and len(err.splitlines()) == 1
    assert sorted((tmp_path / "bowl-sim-v1").iterdir()) == runs_before  # no half-made run directory


@pytest.mark.slow
def test_the_pip_layout_matches_a_real_pip_install(site, tmp_path):
    """Opt-in (needs a few seconds of pip): pip writes the entry points our fast layout writes."""
    guide = plugin_files()
    source = write_package(tmp_path / "src", guide.pop("pyproject.toml"), guide)
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    (real,) = target.glob("my_zo_sims-*.dist-info")
    ours = site / real.name
    assert (real / "entry_points.txt").read_text().strip() == (ours / "entry_points.txt").read_text().strip()
    out = run_cli(["check-oracle", "bowl-sim-v1"], target, tmp_path)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("OK")
