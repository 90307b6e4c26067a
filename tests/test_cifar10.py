"""problems/cifar10: the restricted reader, the data pipeline, the recipe, a few steps on fake data."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from blackbox_zo.cli import main as cli_main
from blackbox_zo.config import resolve_config
from blackbox_zo.problem import ProblemSetupError
from blackbox_zo.trainer import Trainer
from problems.cifar10 import CIFAR_DIRNAME, CifarBatches, Cifar10Problem, augment, load_cifar10, read_cifar_batch
from oracles.model_loss import ModelLossOracle
from problems.models import RESNET20_DEEPZERO_PARAMS, resnet20


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny operations: a second intra-op thread only adds synchronisation
    (measured: several times slower on the shared 2-core machine), so use one and restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes (SHORT_BINSTRING / BINSTRING), as the original
    CIFAR-10 files (pickled by Python 2's cPickle, protocol 2) store them; Python 3 would
    write a `_codecs.encode` call instead, which the real files do not contain."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def write_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A batch file in the layout of cifar-10-batches-py (keys and array as the originals)."""
    entry = {b"batch_label": b"fake batch", b"labels": labels, b"data": images.reshape(len(labels), -1),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(entry)
    # the original files name numpy's reconstructor numpy.core.multiarray (numpy >= 2 writes numpy._core)
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def make_fake_cifar(root: Path, per_batch: int = 12, n_test: int = 16, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    d = root / CIFAR_DIRNAME
    d.mkdir(parents=True)
    first = None
    for i in range(1, 6):
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_batch(d / f"data_batch_{i}", images, labels)
        first = first or (images, labels)
    write_batch(d / "test_batch", rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                [int(v) for v in rng.integers(0, 10, n_test)])
    return first


@pytest.fixture
def fake_root(tmp_path):
    make_fake_cifar(tmp_path / "data")
    return tmp_path / "data"


# --------------------------------------------------------------------------- reading


def test_reads_the_standard_layout_with_only_numpy_globals(tmp_path):
    images, labels = make_fake_cifar(tmp_path)
    raw = (tmp_path / CIFAR_DIRNAME / "data_batch_1").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw  # the originals' spelling
    x, y = read_cifar_batch(tmp_path / CIFAR_DIRNAME / "data_batch_1")
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images)) and y.tolist() == labels
    x_tr, y_tr, x_te, y_te = load_cifar10(tmp_path)
    assert x_tr.shape == (60, 3, 32, 32) and y_tr.shape == (60,) and x_te.shape == (16, 3, 32, 32)
    assert load_cifar10(tmp_path / CIFAR_DIRNAME)[0].shape == x_tr.shape  # the batches directory itself works too


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'echo pwned'\ntR.",  # would run a shell command if the global were resolved
    pickle.dumps({"data": b"x"}, protocol=2),  # Python 3 bytes: needs _codecs.encode, not in a real batch
], ids=["os.system", "_codecs.encode"])
def test_refuses_anything_but_numpy_arrays(tmp_path, payload):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(ProblemSetupError, match="refusing to load (os.system|_codecs.encode)"):
        read_cifar_batch(path)


def test_malformed_batch_is_named(tmp_path):
    path = tmp_path / "data_batch_1"
    write_batch(path, np.zeros((2, 3, 32, 32), np.uint8), [1, 12])
    with pytest.raises(ProblemSetupError, match="labels.*0..9"):
        read_cifar_batch(path)


def test_missing_dataset_is_one_line_and_leaves_no_run(tmp_path, capsys):
    root = tmp_path / "nowhere"
    with pytest.raises(ProblemSetupError) as info:
        load_cifar10(root)
    msg = str(info.value)
    assert "\n" not in msg and str(root.resolve() / CIFAR_DIRNAME) in msg and "cifar-10-python.tar.gz" in msg
    out_dir = tmp_path / "runs"
    code = cli_main(["train", "cifar10", "--set", f"data.root={root}", "--set", f"run.out_dir={out_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "CIFAR-10 not found" in err
    assert not any(p.is_file() for p in out_dir.rglob("*"))  # no half-written run


# ------------------------------------------------------------------------ the recipe


def test_resnet20_has_deepzeros_parameter_count():
    assert sum(p.numel() for p in resnet20().parameters()) == RESNET20_DEEPZERO_PARAMS == 269_722


def test_default_config_is_the_papers_recipe():
    cfg = resolve_config(Cifar10Problem.config_model, Cifar10Problem().default_config())
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs, cfg.run.epochs, cfg.data.batch_size) == ("cosine", 3.0, 50, 256)
    assert (cfg.estimator.kind, cfg.estimator.mu) == ("cge", 5e-3)
    sp = cfg.sparsity
    assert (sp.enabled, sp.method, sp.sparsity, sp.q, sp.resample_every_epochs) == (True, "zo-grasp", 0.9, 192, 5)
    assert cfg.model.feature_reuse


def test_augmentation_is_a_crop_of_the_padded_image_and_a_flip():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=gen)
    out = augment(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(64):  # every output is one of the 9x9x2 crops/flips of its own padded image
        crops = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # [3, 9, 9, 32, 32]
        hits = [(a, b, f) for a in range(9) for b in range(9) for f in (0, 1)
                if torch.equal(crops[:, a, b].flip(-1) if f else crops[:, a, b], out[i])]
        assert hits, f"image {i} is not a crop/flip of its input"


def test_batches_are_a_pure_function_of_epoch_and_index(fake_root):
    x_tr, y_tr, _, _ = load_cifar10(fake_root)
    a = CifarBatches(x_tr, y_tr, batch_size=8, seed=3)
    b = CifarBatches(x_tr, y_tr, batch_size=8, seed=3)
    xa, ya = a.batch(2, 1)
    b.batch(0, 0)
    xb, yb = b.batch(2, 1)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and a.num_batches(0) == 60 // 8
    assert not torch.equal(xa, a.batch(3, 1)[0])


def test_sparsity_setup_keeps_ten_percent_of_weights_plus_norm_and_bias(fake_root):
    cfg = resolve_config(Cifar10Problem.config_model, Cifar10Problem().default_config(), None,
                         [f"data.root={fake_root}", "sparsity.q=2", "sparsity.samples_per_class=1"])
    setup = Cifar10Problem().setup(cfg)
    space = setup.oracle.space
    weights = sum(b.numel for b in space if len(b.shape) >= 2)
    others = space.dim - weights  # batch-norm affine parameters and the fc bias: always estimated
    assert setup.coord_sampler.coords(0).numel() == round(0.1 * weights) + others
    assert setup.oracle.ledger.counts["prune"] == setup.extras["sparsity"]["prune_queries"] > 0


# --------------------------------------------------------------------- a few steps


class FixedCoords:
    def __init__(self, coords):
        self._coords = coords

    def coords(self, epoch):
        return self._coords


def _short_run(root: Path, feature_reuse: bool, coords: torch.Tensor) -> tuple[torch.Tensor, dict]:
    cfg = resolve_config(Cifar10Problem.config_model, Cifar10Problem().default_config(), None,
                         [f"data.root={root}", "sparsity.enabled=false", f"model.feature_reuse={feature_reuse}",
                          "data.batch_size=4", "run.max_steps=2", "run.progress=false", "data.test_size=4",
                          "optimizer.weight_decay=0"])  # so that only the estimated coordinates move
    setup = Cifar10Problem().setup(cfg)
    setup.coord_sampler = FixedCoords(coords)
    summary = Trainer(setup, cfg).fit()
    return setup.oracle.space.flatten_module(setup.module), summary


def test_two_steps_with_and_without_feature_reuse_agree(fake_root):
    space = ModelLossOracle(resnet20(), feature_reuse=False).space
    gen = torch.Generator().manual_seed(0)
    # one coordinate in every third block: the stem, convs and norms of blocks in all three stages, fc
    coords = torch.cat([b.offset + torch.randperm(b.numel, generator=gen)[:1] for b in list(space)[::3]])
    torch.manual_seed(0)
    start = space.flatten_module(resnet20())
    theta_reuse, summary = _short_run(fake_root, True, coords)
    theta_plain, _ = _short_run(fake_root, False, coords)
    assert torch.equal(theta_reuse != start, torch.isin(torch.arange(space.dim), coords))  # exactly those moved
    # float32, two SGD steps from the same start: the paths differ by rounding only (losses to ~1e-7
    # relative, i.e. ~1e-4 in a finite difference divided by mu, times lr); 1e-5 is far below the steps
    torch.testing.assert_close(theta_reuse, theta_plain, rtol=0, atol=1e-5)
    assert float((theta_reuse - start).abs().max()) > 1e-3
    assert summary["queries"]["train"] == 2 * (coords.numel() + 1) and summary["steps"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_loss"] == summary["test_loss"]


def test_cli_trains_on_fake_cifar(fake_root, tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli_main(["train", "cifar10", "--set", f"data.root={fake_root}", "--set", "estimator=rge",
                     "--set", "estimator.q=2", "--set", "data.batch_size=8",
                     "--set", "run.max_steps=3", "--set", "run.progress=false", "--set", f"run.out_dir={out}",
                     "--set", "run.device=cpu"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["steps"] == 3 and summary["queries"]["train"] == 3 * 3 and "test_acc" in summary


def test_unavailable_device_is_a_clear_error(fake_root):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = resolve_config(Cifar10Problem.config_model, Cifar10Problem().default_config(), None,
                         [f"data.root={fake_root}", "run.device=cuda"])
    with pytest.raises(ProblemSetupError, match="run.device='cuda'.*no CUDA"):
        Cifar10Problem().setup(cfg)
