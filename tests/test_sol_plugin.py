"""An out-of-tree simulator plug-in, trained with `blackbox-zo train sol` end to end.

The package is the one in docs/sol.md (its pyproject.toml and module are the guide's blocks):
a damped oscillator stepped by explicit Euler, registered in the entry-point group
`blackbox_zo.simulators`, with its exact solution as the high-fidelity twin. It is installed
into a temporary site directory the way pip lays it out (tests/test_plugins.py), and the
guide's three commands run in a fresh interpreter, outside the repository, so the simulator
is found through importlib.metadata exactly as an installed one is.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from test_docs_oracles import guide_blocks
from test_plugins import install_like_pip, run_cli, write_package

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "sol.md"


def blocks():
    return guide_blocks(GUIDE.read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    files = {b.marker[len("file: "):]: b.code for b in blocks() if b.marker and b.marker.startswith("file: ")}
    assert set(files) == {"pyproject.toml", "my_sims/__init__.py"}
    base = tmp_path_factory.mktemp("simplugin")
    install_like_pip(write_package(base / "my-sims", files.pop("pyproject.toml"), files), base / "site")
    return base / "site"


def guide_commands() -> list[list[str]]:
    (block,) = [b for b in blocks() if b.marker == "plugin-commands"]
    lines = [line.split("#")[0].strip() for line in block.code.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("blackbox-zo ")]


def test_the_guides_simulator_plugin_is_listed_checked_and_trained(site, tmp_path):
    listed, checked, trained = guide_commands()
    assert listed == ["list"] and checked == ["check-simulator", "oscillator-v1"] and trained[:2] == ["train", "sol"]

    out = run_cli(listed, site, tmp_path)
    assert out.returncode == 0, out.stderr
    section = out.stdout.split("simulators (")[1]
    assert "oscillator-v1" in section and "explicit Euler" in section and "burgers-v1" in section

    out = run_cli(checked, site, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[PASS] batch independence" in out.stdout and out.stdout.rstrip().endswith("OK")
    assert "[SKIP] differentiable: declares differentiable=False" in out.stdout  # it declares nothing: not differentiable

    runs = tmp_path / "runs"
    out = run_cli([*trained, "--set", f"run.out_dir={runs}", "--set", "run.progress=false",
                   "--set", f"sol.cache_dir={tmp_path / 'cache'}"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (runs / "sol").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sol"]["simulator"] == "oscillator-v1" and summary["zeroth_order"]
    # a vector state gets an MLP: (2 + 1) -> 8 -> 8 -> 2 with the default width 8, depth 2
    d = (3 * 8 + 8) + (8 * 8 + 8) + (8 * 2 + 2)
    assert summary["queries"]["train"] == 4 * 10 * (d + 1)
    # the report compares the trained corrector with the Euler solver alone on the 2 test runs
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in
            (run_dir / "test_mae.md").read_text().splitlines()[2:]}
    assert rows["ZO-SOL"] == pytest.approx(summary["test_mae"], rel=1e-3)
    # measured: SRC 0.0467, ZO-SOL 0.0230 (docs/sol.md); an untrained corrector is 1.0 x SRC
    assert rows["ZO-SOL"] < 0.6 * rows["SRC"], rows
