"""`blackbox-zo certify` (per-image checkpoints, outputs, --compare with its sign test), ZO-AE-DS's
latent estimate against autograd, and the certified defense on the user's own assets (image
folders, .npz, an ONNX classifier of another shape)."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import as_sets, only_run, run_cli


@pytest.fixture(scope="module")
def tiny_run(tiny_defense, tmp_path_factory):
    """A finished tiny `train certified-defense` run (built-in classifier, 2 ZO steps)."""
    from blackbox_zo.cli import main

    _, overrides, _ = tiny_defense
    out = tmp_path_factory.mktemp("certify-run")
    sets = [o for o in overrides if not o.startswith("run.out_dir=")] + [f"run.out_dir={out}"]
    assert main(["train", "certified-defense", *as_sets(sets)]) == 0
    return only_run(out), sets


SMALL = ["--n", "100", "--n0", "10", "--test-size", "10", "--batch", "500", "--no-progress"]


def test_certify_writes_table_curve_csv_and_resumes_after_an_interruption(tiny_run, tmp_path, capsys, monkeypatch):
    import oracles.certification as certification
    from blackbox_zo.interrupts import Interrupted

    run, _ = tiny_run
    code, stdout, err = run_cli(["certify", run, *SMALL, "--out", tmp_path / "ref"], capsys)
    assert code == 0, err
    ref = list(csv.DictReader(open(tmp_path / "ref" / "certify.csv")))
    assert list(ref[0]) == ["test_index", "label", "prediction", "radius", "correct"]
    assert len(ref) == 10 and sorted(int(r["label"]) for r in ref) == list(range(10))  # class-balanced
    for r in ref:
        assert int(r["correct"]) == int(int(r["prediction"]) == int(r["label"]))
        assert float(r["radius"]) >= 0 and (int(r["prediction"]) >= 0 or float(r["radius"]) == 0)
    table = (tmp_path / "ref" / "table.csv").read_text().splitlines()
    row = next(csv.DictReader(table))
    correct = [(int(r["correct"]), float(r["radius"])) for r in ref]
    for radius in (0, 0.25):  # the table is the CSV's certified share at each radius
        assert float(row[f"ca@{radius:g}"]) == pytest.approx(np.mean([c and rad >= radius for c, rad in correct]))
    assert (tmp_path / "ref" / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["stopped"] == "completed" and summary["reused_points"] == 0
    # N0 + N black-box images per test image, plus one image to read the number of classes
    assert summary["black_box"]["images"] == 10 * 110 + 1
    assert "| denoiser |" in stdout

    # interrupted (SIGINT) while certifying the 5th image: 4 images kept, one line, exit 130
    real = certification.certify
    calls = {"n": 0}

    def interrupted_at_5th(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupted(signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(certification, "certify", interrupted_at_5th)
    out = tmp_path / "cut"
    code, _, err = run_cli(["certify", run, *SMALL, "--out", out], capsys)
    lines = err.strip().splitlines()  # the cost line printed at the start, then the stop in one line
    assert code == 130 and len(lines) == 2 and lines[0].startswith("certifying 10 test images"), err
    assert lines[1].startswith("blackbox-zo: interrupted by SIGINT during certification (4 of 10 images certified")
    assert lines[1].endswith("run the same command again to resume")
    assert json.loads((out / "summary.json").read_text())["stopped"] == "interrupted"
    assert not (out / "certify.csv").exists()  # no half-written result
    with open(out / "points.jsonl", "a") as fh:  # a line torn by a crash is dropped, not trusted
        fh.write('{"index": 3, "label": 1, "pre')
    monkeypatch.setattr(certification, "certify", real)

    code, _, err = run_cli(["certify", run, *SMALL, "--out", out], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused_points"] == 4 and summary["black_box"]["images"] == 6 * 110 + 1
    assert list(csv.DictReader(open(out / "certify.csv"))) == ref  # bitwise the uninterrupted result


def test_certify_rejects_bad_settings_in_one_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    for args, needle in ((["--n", "0"], "--n must be >= 1"), (["--alpha", "1.5"], "--alpha must be in (0, 1)"),
                         (["--radii", "0,x"], "--radii"), (["--set", "optimizer.lr=1"], "certify --set takes"),
                         (["--denoiser", str(tmp_path / "missing.pt")], "no such file")):
        code, _, err = run_cli(["certify", run, *SMALL, "--out", tmp_path / "o", *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    code, _, err = run_cli(["certify", "--n", "10"], capsys)
    assert code == 2 and "needs a RUN_DIR" in err


def test_compare_certifies_every_row_over_two_seeds_with_the_sign_test(tiny_run, tmp_path, capsys):
    from scipy.stats import binomtest

    from blackbox_zo import rundir
    from blackbox_zo.config import resolve_config
    from problems.certified_defense import CertifiedDefenseConfig, prepare_stages

    run, _ = tiny_run
    out = tmp_path / "compare"
    args = ["certify", run, "--compare", "--seeds", "0,1", *SMALL, "--out", out, "--radii", "0,0.25"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["key"] for r in rows] == ["none", "mse", "fo-ds", "zo-ae-ds", "zo"]
    summary = json.loads((out / "summary.json").read_text())
    certified = {}
    for key in ("none", "mse", "fo-ds", "zo-ae-ds", "zo"):
        per_seed = []
        for seed in (0, 1):
            (points,) = (out / f"seed{seed}" / key).glob("certify-*/certify.csv")
            recs = list(csv.DictReader(open(points)))
            assert len(recs) == 10
            per_seed.append([(int(r["correct"]), float(r["radius"])) for r in recs])
        certified[key] = per_seed
        row = next(r for r in summary["table"] if r["key"] == key)
        for radius in (0, 0.25):
            shares = [np.mean([c and rad >= radius for c, rad in s]) for s in per_seed]
            assert row[f"ca@{radius:g}_per_seed"] == pytest.approx(shares)
            assert row[f"ca@{radius:g}"] == pytest.approx(np.mean(shares))
    # the paired sign test, recomputed from the per-image CSVs with scipy
    for test in summary["sign_tests"]:
        radius = test["radius"]
        ours = np.array([c and rad >= radius for s in certified["zo"] for c, rad in s])
        other = np.array([c and rad >= radius for s in certified[test["versus"]] for c, rad in s])
        wins, losses = int((ours & ~other).sum()), int((~ours & other).sum())
        assert (test["ours_only"], test["other_only"]) == (wins, losses)
        p = 1.0 if wins + losses == 0 else binomtest(wins, wins + losses, 0.5).pvalue
        assert test["p"] == pytest.approx(p, abs=5e-5)
    assert len(summary["sign_tests"]) == 4 * 2
    # FO-DS trains the WHOLE denoiser: every parameter tensor moved away from the MSE denoiser
    fo = rundir.load_checkpoint(out / "seed0" / "fo-ds").state["module"]
    config = resolve_config(CertifiedDefenseConfig, rundir.read_run_config(run), None, [])
    mse = torch.load(prepare_stages(config, log=lambda *_: None).denoiser_mse, weights_only=True)
    weights = [k for k in fo if k.endswith(".weight")]
    assert len(weights) == 4 and all(not torch.equal(fo[k], mse[k]) for k in weights)
    # ZO-AE-DS follows the run's step budget (run.max_steps = 2): 2 steps of d_z + 1 = 17 loss values
    zo_ae = next(r for r in rows if r["key"] == "zo-ae-ds")
    assert zo_ae["cost"].startswith("2 steps, 34 loss queries (17/step)")
    # run again: every certified image and every trained row is read back, nothing is recomputed
    code, stdout2, err = run_cli(args, capsys)
    assert code == 0, err
    again = json.loads((out / "summary.json").read_text())
    assert all(v == [10, 10] for v in again["reused_points"].values())
    assert again["table"] == summary["table"] and "[compare] training" not in err


# --------------------------------------------------------------------------- ZO-AE-DS


def test_latent_cge_matches_autograd_per_image():
    from problems.certified_defense.zo_ae_ds import latent_cge

    gen = torch.Generator().manual_seed(0)
    b, d, k = 5, 6, 4
    w = torch.randn(k, d, generator=gen, dtype=torch.float64)
    z = torch.randn(b, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, k, (b,), generator=gen)
    calls = []

    def score(latents):
        calls.append(latents.shape[0])
        return torch.log_softmax(torch.tanh(latents) @ w.T, dim=1)

    grad, loss, spent = latent_cge(score, z, labels, mu=1e-6)
    zz = z.clone().requires_grad_(True)
    ref_losses = nn.functional.cross_entropy(torch.log_softmax(torch.tanh(zz) @ w.T, dim=1), labels, reduction="none")
    (ref,) = torch.autograd.grad(ref_losses.sum(), zz)  # image b's loss depends on z_b only
    # forward difference: error <= mu/2 * max|second derivative| ~ 1e-6 here
    assert torch.allclose(grad, ref, atol=1e-5, rtol=0)
    assert torch.allclose(loss, ref_losses.detach(), atol=1e-12)
    assert spent == d + 1 and calls == [(d + 1) * b]  # one call for every latent batch


def test_zo_ae_ds_step_is_the_chain_rule_through_encoder_and_denoiser():
    """One ZO-AE-DS gradient (CGE over the latent, then backward through E and D) against autograd
    of the same loss through a white-box copy of decoder + classifier."""
    from oracles.smoothing import DnCNN
    from problems.certified_defense.zo_ae_ds import AutoEncoder, latent_cge

    torch.manual_seed(0)
    den = DnCNN(channels=1, depth=3, width=4, batch_norm=False).double()
    with torch.no_grad():
        den.last.weight.normal_(0, 0.1)
    ae = AutoEncoder(1, 8, 8, latent=6, hidden=4).double()
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=gen)

    z = ae.encoder(den(x))
    with torch.no_grad():  # the query-only part: decoder + classifier, loss values only (float64 here)
        g, _, _ = latent_cge(lambda v: torch.log_softmax(head(ae.decoder(v)), 1), z.detach(), y, mu=1e-7)
    z.backward(g / x.shape[0])
    zo = [p.grad.clone() for p in [*den.parameters(), *ae.encoder.parameters()]]
    for p in [*den.parameters(), *ae.encoder.parameters()]:
        p.grad = None
    nn.functional.cross_entropy(head(ae.decoder(ae.encoder(den(x)))), y).backward()
    fo = [p.grad for p in [*den.parameters(), *ae.encoder.parameters()]]
    # forward differences at mu = 1e-7 in float64: truncation ~ mu x curvature, rounding ~ 1e-16 / mu
    for a, b in zip(zo, fo):
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max().item() + 1e-9), (a - b).abs().max()


# ------------------------------------------------------------------------ user assets


def _linear_onnx(path: Path, shape: tuple[int, int, int], classes: int, seed: int = 0) -> Path:
    """A linear classifier [N, C, H, W] -> [N, classes] written with onnx.helper (no exporter)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    features = int(np.prod(shape))
    w = numpy_helper.from_array(rng.normal(0, 0.3, (features, classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (classes,)).astype(np.float32), "b")
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["scores"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                              ["batch", *shape])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _rgb_npz(path: Path, n: int = 60, classes: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    x = rng.integers(0, 256, size=(len(y), 8, 8, 3), dtype=np.uint8)  # NHWC
    np.savez(path, x=x, y=y)
    return path


def test_image_folder_and_npz_are_read_exactly(tmp_path):
    from PIL import Image

    from blackbox_zo.problem import ProblemSetupError
    from problems.certified_defense.assets import ImageSettings, load_images

    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            a = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
            Image.fromarray(a, "RGB").save(tmp_path / "imgs" / cls / f"{i}.png")
            pixels[(cls, i)] = a
    data = load_images(ImageSettings(source=str(tmp_path / "imgs"), test_fraction=0.2), seed=0)
    assert data.shape == (3, 6, 4) and data.classes == ["cat", "dog"]
    assert data.x_train.shape[0] == 8 and sorted(data.y_test.tolist()) == [0, 1]  # one of each class held out
    everything = {tuple(np.round(x.numpy().transpose(1, 2, 0) * 255).astype(np.uint8).ravel())
                  for x in torch.cat([data.x_train, data.x_test])}
    assert everything == {tuple(a.ravel()) for a in pixels.values()}  # PNG -> [0, 1] exactly
    gray = load_images(ImageSettings(source=str(tmp_path / "imgs"), channels=1, size=(4, 4)), seed=0)
    assert gray.shape == (1, 4, 4)
    first_identity = data.identity
    Image.fromarray(pixels[("dog", 0)][::-1].copy(), "RGB").save(tmp_path / "imgs" / "dog" / "0.png")
    assert load_images(ImageSettings(source=str(tmp_path / "imgs")), seed=0).identity["sha256"] != \
        first_identity["sha256"]  # another image -> another stage-cache key
    Image.fromarray(pixels[("cat", 0)][:5], "RGB").save(tmp_path / "imgs" / "cat" / "odd.png")
    with pytest.raises(ProblemSetupError, match=r"2 different sizes .* set images.size=\[H, W\]"):
        load_images(ImageSettings(source=str(tmp_path / "imgs")), seed=0)

    npz = _rgb_npz(tmp_path / "rgb.npz")
    raw = np.load(npz)
    data = load_images(ImageSettings(source=str(npz)), seed=0)
    assert data.shape == (3, 8, 8) and data.x_train.shape[0] + data.x_test.shape[0] == 60
    x_all = torch.cat([data.x_train, data.x_test])
    assert {tuple(np.round(x.numpy().transpose(1, 2, 0) * 255).astype(np.uint8).ravel()) for x in x_all} == \
        {tuple(a.ravel()) for a in raw["x"]}
    for name, arrays, needle in (
            ("noy.npz", {"x": raw["x"]}, "needs arrays 'x' and 'y'"),
            ("big.npz", {"x": raw["x"].astype(np.float32), "y": raw["y"]}, r"float images must be finite and in \[0, 1\]"),
            ("fewy.npz", {"x": raw["x"], "y": raw["y"][:5]}, "y must be \\[N\\] integer labels"),
            ("obj.npz", {"x": np.array([None] * 3, dtype=object), "y": raw["y"][:3]}, "cannot read it")):
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ProblemSetupError, match=needle):
            load_images(ImageSettings(source=str(tmp_path / name)), seed=0)


def test_defense_on_your_onnx_classifier_and_your_images(tmp_path, capsys):
    """An RGB .npz and a 3-channel ONNX classifier: the denoiser is sized to the images, the stage
    cache is keyed by the classifier file, certify runs on the run, and a mismatch is one line."""
    for module in ("onnxruntime", "onnx"):
        pytest.importorskip(module, reason=f"needs the onnx extra ({module} missing)")
    from serve_helpers import TINY

    from blackbox_zo import rundir

    overrides = TINY
    npz = _rgb_npz(tmp_path / "rgb.npz")
    onnx_a = _linear_onnx(tmp_path / "a.onnx", (3, 8, 8), 3, seed=0)
    onnx_b = _linear_onnx(tmp_path / "b.onnx", (3, 8, 8), 3, seed=1)
    base = [o for o in overrides if not o.startswith(("run.out_dir=", "defense.artifacts_dir="))]
    stages = tmp_path / "stages"
    runs = {}
    for name, onnx in (("a", onnx_a), ("b", onnx_b)):
        sets = base + [f"run.out_dir={tmp_path / name}", f"defense.artifacts_dir={stages}",
                       f"classifier.source={onnx}", f"images.source={npz}"]
        code, _, err = run_cli(["train", "certified-defense", *as_sets(sets)], capsys)
        assert code == 0, err
        runs[name] = only_run(tmp_path / name)
    state = rundir.load_checkpoint(runs["a"]).state["module"]
    assert state["prefix.0.weight"].shape[1] == 3 and state["last.weight"].shape[0] == 3  # RGB in, RGB out
    summary = json.loads((runs["a"] / "summary.json").read_text())
    # the last layer maps width 4 -> 3 channels: d = 4 x 3 x 9 + 3 = 111, so 112 loss values a step; images:
    # labels of the 48 training images, 2 steps x 112 loss values x 16 images, 12 test images x (1 + 1 draw)
    d = 4 * 3 * 9 + 3
    assert summary["queries"]["train"] == 2 * (d + 1)
    assert summary["black_box"]["images"] == 48 + 2 * (d + 1) * 16 + 12 * 2
    keyed = sorted(p.name for p in stages.iterdir())
    assert len(keyed) == 2  # one MSE denoiser per classifier file: the key holds its SHA-256
    info = [json.loads((stages / k / "stages.json").read_text())["classifier"]["sha256"] for k in keyed]
    assert sorted(info) == sorted(__import__("hashlib").sha256(p.read_bytes()).hexdigest() for p in (onnx_a, onnx_b))

    code, stdout, err = run_cli(["certify", runs["a"], "--n", "50", "--n0", "10", "--test-size", "6", "--batch", "200",
                               "--no-progress", "--out", tmp_path / "cert"], capsys)
    assert code == 0, err
    assert len(list(csv.DictReader(open(tmp_path / "cert" / "certify.csv")))) == 6

    # a 1-channel classifier in front of RGB images: one line naming both shapes, exit 2, no run left
    gray = _linear_onnx(tmp_path / "gray.onnx", (1, 8, 8), 3)
    sets = base + [f"run.out_dir={tmp_path / 'bad'}", f"defense.artifacts_dir={stages}",
                   f"classifier.source={gray}", f"images.source={npz}"]
    code, _, err = run_cli(["train", "certified-defense", *as_sets(sets)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the images are [batch, 3, 8, 8]" in err, err
    # the built-in digits classifier cannot take RGB images either
    sets[-2] = "classifier.source=digits"
    code, _, err = run_cli(["train", "certified-defense", *as_sets(sets)], capsys)
    assert code == 2 and "takes [batch, 1, 8, 8] images" in err and len(err.strip().splitlines()) == 1, err


def test_the_cli_parser_with_certify_and_serve_onnx_imports_no_torch():
    """`blackbox-zo --help` stays fast: the plug-in commands' classes import nothing heavy."""
    import subprocess
    import sys

    code = ("import sys, blackbox_zo.cli as c; p = c.build_parser(); "
            "assert {'certify', 'serve-onnx'} <= set(p._subparsers._group_actions[0].choices); "
            "print(sorted(m for m in ('torch', 'httpx', 'mlserver', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
