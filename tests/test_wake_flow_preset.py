"""The wake flow as a preset of the generic `sol` problem gives BITWISE the results of the
wake-flow problem it replaced.

The expected values are not numbers written here: the test setup extracts the code of
`PARITY_COMMIT` (the last commit with the wake flow's own problem, experiment and data code)
from git into a temporary directory and runs `blackbox-zo train wake-flow` and
`blackbox-zo experiment wake-flow` there, in a fresh interpreter, on a tiny configuration;
then it runs the same commands in this tree and compares every test MAE, loss and trained
weight for exact equality. The old tree gets this tree's seeded-direction sampler
(tests/sampler_splice.py): ZO-GraSP's directions changed with it, nothing the preset did. Skipped where git or that commit is not available (a shallow
clone, an sdist).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sampler_splice import splice_current_sampler

pytest.importorskip("phi")

ROOT = Path(__file__).resolve().parents[1]
PARITY_COMMIT = "5a9262b"  # main before the wake flow became a preset of `sol`

TINY = ["wake.lo_nx=8", "wake.hifi_factor=2", "wake.skip_steps=10", "wake.record_steps=8",
        "wake.train_re=[100.0, 400.0]", "wake.test_re=[200.0]", "wake.unroll=2", "wake.windows=2",
        "wake.batches_per_epoch=2", "wake.prune_windows=2", "run.epochs=2", "sparsity.q=4", "run.threads=1",
        "run.progress=false"]
# ZO-GraSP layer ratios scored at the default scale: the sparsity path the experiment does not take
GRASP = ["sparsity.method=zo-grasp", "wake.grasp_at=default-scale", "sparsity.sparsity=0.8"]

SCRIPT = """
import json, sys
from blackbox_zo.cli import main
import problems.wake_flow
out = sys.argv[1]
sets = lambda items: [a for s in items for a in ("--set", s)]
tiny, grasp = json.loads(sys.argv[2]), json.loads(sys.argv[3]) + json.loads(sys.argv[4])
cache = [f"wake.cache_dir={out}/cache"]
assert main(["experiment", "wake-flow", "--out", f"{out}/exp", *sets(tiny + cache)]) == 0
assert main(["train", "wake-flow", *sets(tiny + grasp + cache + [f"run.out_dir={out}/runs"])]) == 0
print(problems.wake_flow.__file__)
"""


def _run(tree: Path | None, out: Path, new: list[str]) -> str:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), json.dumps(TINY), json.dumps(GRASP), json.dumps(new)],
                          capture_output=True, text=True, env=env, cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(ROOT), "cat-file", "-e", f"{PARITY_COMMIT}^{{commit}}"],
                                     capture_output=True).returncode != 0:
        pytest.skip(f"needs git and commit {PARITY_COMMIT} (the code the preset replaced)")
    base = tmp_path_factory.mktemp("parity")
    old_tree, old_out, new_out = base / "tree", base / "old", base / "new"
    for d in (old_tree, old_out, new_out):
        d.mkdir()
    archive = subprocess.run([git, "-C", str(ROOT), "archive", PARITY_COMMIT, "blackbox_zo", "oracles", "problems"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
    splice_current_sampler(old_tree)  # ZO-GraSP's directions are drawn in blocks now: compare everything else
    old_file = _run(old_tree, old_out, [])
    assert old_file.startswith(str(old_tree)), old_file  # the old code really ran
    # the wake flow's default is now NON's corrector then ES (tests/test_wake_flow_default.py): the old code's
    # method is DeepZero's ZO-SOL from the initial corrector (docs/wake-flow.md's recipe for the old default, less
    # its run.epochs, which TINY sets; the experiment's FO-SOL and ZO-SOL pin all of it themselves)
    new_file = _run(None, new_out, ["wake.warm_start=none", "estimator=cge", "sparsity.enabled=true",
                                    "run.eval_every_epochs=80", "wake.warm_start_steps=null"])
    assert new_file.startswith(str(ROOT)), new_file
    return old_out, new_out


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def test_experiment_wake_flow_gives_bitwise_the_same_table(outputs):
    old, new = (_summary(o / "exp" / "summary.json") for o in outputs)
    rows = lambda s: {r["method"]: {k: v for k, v in r.items() if k.startswith("mae")} for r in s["table"]}  # noqa: E731
    assert list(rows(new)) == ["SRC", "NON", "FO-SOL", "ZO-SOL"]
    assert rows(new) == rows(old)  # exact float equality (JSON keeps every bit of a float)
    for name in ("NON", "FO-SOL", "ZO-SOL"):
        o, n = old["summaries"][name], new["summaries"][f"{name}/seed0"]  # the generic experiment runs seeds
        assert n.get("final_loss") == o.get("final_loss"), name
        if name != "NON":
            assert (n["steps"], n["queries"]) == (o["steps"], o["queries"]), name
    assert new["non_steps"] == old["non_steps"] and new["non_batch"] == old["non_batch"]


def test_train_wake_flow_gives_bitwise_the_same_weights(outputs):
    (old_dir,), (new_dir,) = (list((o / "runs" / "wake-flow").iterdir()) for o in outputs)
    old, new = _summary(old_dir / "summary.json"), _summary(new_dir / "summary.json")
    assert new["test_mae"] == old["test_mae"] and new["queries"] == old["queries"]
    assert old["queries"]["prune"] > 0  # ZO-GraSP scored the corrector
    losses = lambda d: [r.get("loss") for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(new_dir) == losses(old_dir) and any(v is not None for v in losses(old_dir))
    load = lambda d: torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)["module"]  # noqa: E731
    old_w, new_w = load(old_dir), load(new_dir)
    assert list(new_w) == list(old_w)
    for key in old_w:
        assert torch.equal(new_w[key], old_w[key]), key
    assert (new_dir / "vorticity.png").is_file() and (new_dir / "test_mae.md").is_file()
