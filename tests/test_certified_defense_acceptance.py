"""Opt-in acceptance run of issue 6 (`make test-slow`): the default certified-defense experiment,
end to end (~30 minutes on 2 quiet cores; much longer on a loaded machine)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_default_experiment_meets_the_issue_acceptance(tmp_path):
    pytest.importorskip("onnxruntime")
    from problems.certified_defense.experiment import main

    assert main(["--out", str(tmp_path), "--no-progress", "--set", f"run.out_dir={tmp_path / 'runs'}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    acceptance = summary["acceptance"]
    # The issue: ZO beats the MSE-only denoiser at r = 0.25 and 0.5 and no denoiser everywhere.
    assert acceptance["zo_beats_mse_at_0.25"], summary["table_markdown"]
    assert acceptance["zo_beats_mse_at_0.5"], summary["table_markdown"]
    assert acceptance["zo_beats_none_everywhere"], summary["table_markdown"]
    # N = 10,000 at alpha = 0.001 and sigma = 0.25 can certify r = 0.75 at all.
    assert summary["settings"]["largest_certifiable_radius"] >= 0.75
    for name in ("table.md", "table.csv", "certified_accuracy.png", "certify_zo.csv"):
        assert (tmp_path / name).stat().st_size > 0
