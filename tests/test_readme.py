"""The README's code must run as printed."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_is_right(capsys):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    est, oracle = scope["est"], scope["oracle"]
    # Rosenbrock gradient at (0.5, 0.5) is (-51, 50); float32 central differences with mu = 1e-4
    # lose ~ eps * f / mu ~ 1e-7 * 1 / 1e-4 = 1e-3 relative per loss value, so allow 0.1 absolute.
    torch.testing.assert_close(est.grad, torch.tensor([-51.0, 50.0]), atol=0.1, rtol=0)
    assert est.queries == 4 and oracle.ledger.counts["train"] == 4
    assert "OK" in capsys.readouterr().out


def test_readme_quickstart_has_exactly_the_two_commands():
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
