"""Running `blackbox-zo` in-process from a test, and finding the run it wrote (shared by the
certified-defense tests: test_certify.py, test_remote_defense.py)."""

from __future__ import annotations

from pathlib import Path


def run_cli(args, capsys) -> tuple[int, str, str]:
    """`blackbox-zo ARGS` in this process: (exit code, stdout, stderr) of that call alone."""
    from blackbox_zo.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def as_sets(items) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [x for o in items for x in ("--set", o)]


def only_run(out: Path, problem: str = "certified-defense") -> Path:
    """The one run directory under OUT/PROBLEM/ (a test that expects exactly one run asserts it)."""
    runs = sorted((out / problem).glob("2*"))
    assert len(runs) == 1, runs
    return runs[0]
