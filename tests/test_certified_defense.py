"""Certified defense (issue 6): Clopper-Pearson, CERTIFY/PREDICT, the eq. (A2) oracle, the
black-box adapters and their query counting, and the digits pipeline at toy size."""

import csv
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest, norm
from torch import nn

from blackbox_zo.config import SparsityConfig
from blackbox_zo.estimators import CGE
from blackbox_zo.oracle import check_oracle
from oracles.certification import (
    ABSTAIN,
    certified_accuracy,
    certify,
    clopper_pearson_lower,
    max_certifiable_radius,
    predict,
    samples_needed,
)
from oracles.classifier import TorchClassifier, log_probabilities
from oracles.smoothing import DefenseBatch, DenoisedSmoothingOracle, DnCNN, NoisyBatches

# ------------------------------------------------------------------ Clopper-Pearson


@pytest.mark.parametrize("n", [1, 10, 100, 5114])
@pytest.mark.parametrize("alpha", [0.05, 0.001])
def test_clopper_pearson_closed_cases(n, alpha):
    # k = n: P(X >= n | p) = p^n = alpha  ->  p = alpha^(1/n).
    # k = 1: P(X >= 1 | p) = 1 - (1 - p)^n = alpha  ->  p = 1 - (1 - alpha)^(1/n).
    # beta.ppf inverts the incomplete beta to ~1e-12 relative; 1e-9 leaves room and would still
    # catch an off-by-one in the beta parameters (which moves the bound by O(1/n)).
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-9)
    assert clopper_pearson_lower(1, n, alpha) == pytest.approx(1 - (1 - alpha) ** (1 / n), rel=1e-9)
    assert clopper_pearson_lower(0, n, alpha) == 0.0


def test_clopper_pearson_is_the_exact_binomial_bound():
    # The defining property, checked with the binomial tail directly: at the bound p_L,
    # P(X >= k | p_L) = alpha (one-sided, exact test inversion).
    for k, n in [(7, 20), (950, 1000), (4990, 5114)]:
        p_low = clopper_pearson_lower(k, n, 0.001)
        assert binom.sf(k - 1, n, p_low) == pytest.approx(0.001, rel=1e-6)
        # and scipy's own exact interval at the two-sided level 2 alpha gives the same number
        two_sided = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * 0.001, method="exact").low
        assert p_low == pytest.approx(two_sided, rel=1e-9)


def test_clopper_pearson_rejects_bad_input():
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_lower(5, 4, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_lower(1, 4, 1.5)


def test_samples_needed_for_radius_075():
    # The number: sigma * Phi^-1(alpha^(1/N)) >= 0.75 at sigma 0.25, alpha 0.001 needs N >= 5114.
    n = samples_needed(0.75, 0.25, 0.001)
    assert n == 5114
    assert max_certifiable_radius(0.25, n - 1, 0.001) < 0.75 <= max_certifiable_radius(0.25, n, 0.001)


# ------------------------------------------------------------------ CERTIFY / PREDICT


class LinearBase:
    """base(z) = 1 if w.z + b > 0 else 0, ||w|| = 1. At x = 0 with eps ~ N(0, sigma^2 I):
    P(class 1) = Phi(b / sigma) exactly, and the exact l2 distance to the boundary is b."""

    def __init__(self, shape, b, seed=0):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).reshape(-1)
        self.w, self.b, self.images = w / w.norm(), b, 0

    def __call__(self, z):
        self.images += z.shape[0]
        return (z.reshape(z.shape[0], -1) @ self.w + self.b > 0).long()


def test_certify_linear_classifier_known_pa():
    sigma, alpha, n, n0, p_a = 0.25, 0.001, 20_000, 100, 0.9
    b = sigma * norm.ppf(p_a)  # the true certified radius of the smoothed classifier
    base = LinearBase((1, 8, 8), b)
    cls, radius = certify(base, torch.zeros(1, 8, 8), sigma, n0, n, alpha, num_classes=2, batch_size=6000,
                          generator=torch.Generator().manual_seed(3))
    assert cls == 1
    assert base.images == n0 + n  # batched sampling sends exactly N0 + N images
    # Statistical tolerance: the n estimation votes are Binomial(n, p_a); P(|k - n p_a| > 4.5 sd) < 1e-5.
    # CERTIFY's radius is monotone in k, so it lies between the radii of the two extreme counts.
    sd = math.sqrt(n * p_a * (1 - p_a))
    k_lo, k_hi = math.floor(n * p_a - 4.5 * sd), math.ceil(n * p_a + 4.5 * sd)
    r_lo = sigma * norm.ppf(clopper_pearson_lower(k_lo, n, alpha))
    r_hi = sigma * norm.ppf(clopper_pearson_lower(k_hi, n, alpha))
    assert r_lo <= radius <= r_hi
    assert radius < b  # a lower bound on the true radius (fails with probability <= alpha)
    assert r_hi - r_lo < 0.1 * b  # the band is tight enough for the check to mean something


def test_certify_abstains_at_a_coin_flip():
    # p_A = 1/2 exactly: the lower bound exceeds 1/2 with probability <= alpha.
    base = LinearBase((4,), 0.0)
    cls, radius = certify(base, torch.zeros(4), 0.5, 50, 2000, 0.001, num_classes=2,
                          generator=torch.Generator().manual_seed(0))
    assert (cls, radius) == (ABSTAIN, 0.0)


class Alternating:
    """Exactly half the votes for class a, half for class b, in every batch (needs an even batch)."""

    def __init__(self, a=2, b=5):
        self.a, self.b = a, b

    def __call__(self, z):
        m = z.shape[0]
        out = torch.full((m,), self.a)
        out[m // 2 :] = self.b
        return out


def test_predict_abstains_on_a_tie_and_answers_a_clear_majority():
    assert predict(Alternating(), torch.zeros(3), 0.25, 1000, 0.001, num_classes=10, batch_size=100) == ABSTAIN
    clear = LinearBase((1, 8, 8), 0.25 * norm.ppf(0.9))
    assert predict(clear, torch.zeros(1, 8, 8), 0.25, 1000, 0.001, num_classes=2,
                   generator=torch.Generator().manual_seed(1)) == 1


def test_certified_accuracy_counts_abstentions_as_wrong():
    preds = np.array([1, ABSTAIN, 2, 3])
    labels = np.array([1, 1, 2, 0])
    radii = np.array([0.3, 0.0, 0.6, 0.9])
    assert certified_accuracy(preds, labels, radii, 0.0) == 0.5
    assert certified_accuracy(preds, labels, radii, 0.5) == 0.25
    assert certified_accuracy(preds, labels, radii, 0.7) == 0.0


# ------------------------------------------------------------------ the eq. (A2) oracle


class RecordingClassifier(TorchClassifier):
    """A torch classifier that keeps every batch of images it is sent."""

    def __init__(self, module, **kw):
        super().__init__(module, **kw)
        self.sent = []

    def _scores(self, x):
        self.sent.append(x.clone())
        return super()._scores(x)


def _small_oracle(classifier=None, **kw):
    torch.manual_seed(0)
    den = DnCNN(channels=1, depth=4, width=6, batch_norm=True)
    with torch.no_grad():
        for m in den.modules():  # non-trivial batch-norm statistics and a non-zero last layer
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        den.last.weight.normal_(0, 0.05)
    clf = classifier or TorchClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    return DenoisedSmoothingOracle(den, clf, **kw)


def _batch(b=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 8, 8, generator=gen)
    return DefenseBatch(x, torch.randint(0, 10, (b,), generator=gen), 0.25 * torch.randn(x.shape, generator=gen))


def test_oracle_passes_check_oracle():
    oracle, batch = DenoisedSmoothingOracle.example()
    report = check_oracle(oracle, batch)
    assert report.ok, str(report)
    report = check_oracle(_small_oracle(), _batch())
    assert report.ok, str(report)


def test_loss_is_eq_a2_cross_entropy():
    # Independent reference: torch's cross_entropy of f(D(x + delta)) against the labels.
    oracle = _small_oracle()
    batch = _batch()
    theta = oracle.initial_theta()
    with torch.no_grad():
        ref = nn.functional.cross_entropy(oracle.classifier.module(oracle.denoiser(batch.x + batch.delta)), batch.labels)
    assert float(oracle.losses(theta[None], batch)[0]) == pytest.approx(float(ref), rel=1e-5)


def test_feature_reuse_matches_full_forward_and_runs_the_prefix_once():
    fast, slow = _small_oracle(), _small_oracle(feature_reuse=False)
    assert fast.feature_reuse and not slow.feature_reuse
    batch = _batch()
    gen = torch.Generator().manual_seed(1)
    thetas = fast.initial_theta()[None] + 0.05 * torch.randn(5, fast.space.dim, generator=gen)
    # float32 convolutions summed in a different order: ~1e-7 relative on losses of O(2).
    torch.testing.assert_close(fast.losses(thetas, batch), slow.losses(thetas, batch), rtol=1e-5, atol=1e-6)
    coords = torch.arange(fast.space.dim)
    fast.coordinate_losses(fast.initial_theta(), coords, 1e-3, batch)
    assert fast.prefix_evaluations == 1  # three calls, one batch: the prefix ran once
    fast.losses(thetas, _batch(seed=1))
    assert fast.prefix_evaluations == 2


def test_full_forward_path_leaves_batch_norm_statistics_alone():
    oracle = _small_oracle(trainable=["prefix.0.weight", "last.weight", "last.bias"])
    assert not oracle.feature_reuse
    oracle.denoiser.train()
    before = {k: v.clone() for k, v in oracle.denoiser.state_dict().items()}
    batch = _batch()
    theta = oracle.initial_theta()[None]
    a = oracle.losses(theta, batch)
    b = oracle.losses(theta, DefenseBatch(batch.x[:3], batch.labels[:3], batch.delta[:3]))
    for k, v in oracle.denoiser.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert oracle.denoiser.training  # mode restored
    # eval-mode batch norm: a per-image loss does not depend on the rest of the batch
    per_image = [float(oracle.losses(theta, DefenseBatch(batch.x[i:i + 1], batch.labels[i:i + 1],
                                                         batch.delta[i:i + 1]))[0]) for i in range(6)]
    assert float(a[0]) == pytest.approx(np.mean(per_image), rel=1e-5)
    assert float(b[0]) == pytest.approx(np.mean(per_image[:3]), rel=1e-5)


def test_delta_is_shared_by_every_perturbation_of_a_step():
    clf = RecordingClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    oracle = _small_oracle(clf)
    theta = oracle.initial_theta().clone()
    w = oracle.space["last.weight"]
    theta[w.slice] = 0.0  # D(z) = z - bias: every image sent is x + delta - bias, exactly
    source = NoisyBatches(_PairBatches(), sigma=0.25, seed=3)
    batch = source.batch(0, 1)
    bias = oracle.space["last.bias"].offset
    mu = 0.01
    # One CGE step over the bias and some weights: the base query plus one per coordinate.
    coords = torch.tensor([0, 5, bias])
    CGE(mu=mu).estimate(oracle, theta, batch, coords=coords)
    sent = torch.cat(clf.sent).view(-1, *batch.x.shape)  # [1 + 3, B, 1, 8, 8]
    assert sent.shape[0] == 4
    noisy = batch.x + batch.delta
    torch.testing.assert_close(sent[0], noisy, rtol=0, atol=1e-6)
    torch.testing.assert_close(sent[3], noisy - mu, rtol=0, atol=1e-6)  # the bias perturbation
    # weight perturbations change D by mu * (features conv e_j): small, but on the same x + delta
    assert float((sent[1:3] - noisy).abs().max()) < 10 * mu
    # the batch source draws delta as a pure function of (seed, epoch, index)
    assert torch.equal(source.batch(0, 1).delta, batch.delta)
    assert not torch.equal(source.batch(0, 2).delta, batch.delta)


class _PairBatches:
    def num_batches(self, epoch):
        return 3

    def batch(self, epoch, index):
        gen = torch.Generator().manual_seed(index)
        return torch.rand(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def test_black_box_counting_is_exact():
    clf = RecordingClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), max_batch=7)
    scores = clf(np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32))  # numpy in
    assert scores.shape == (20, 10) and clf.queries == 20 and clf.calls == 1
    assert [len(s) for s in clf.sent] == [7, 7, 6]
    clf.reset_queries()
    oracle = _small_oracle(clf, max_images_per_call=10)  # 10 // B=4 -> 2 parameter vectors per call
    batch = _batch(b=4)
    oracle.query(oracle.initial_theta()[None].repeat(5, 1), batch)
    assert clf.queries == 5 * 4 and clf.calls == 3  # 2 + 2 + 1 vectors
    est = CGE(mu=1e-3).estimate(oracle, oracle.initial_theta(), batch)
    d = oracle.space.dim
    assert est.queries == d + 1
    assert clf.queries == 5 * 4 + (d + 1) * 4  # every loss value costs exactly B images
    assert oracle.ledger.total == 5 + d + 1


def test_log_probabilities_from_either_output_kind():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    as_logits = TorchClassifier(nn.Identity(), outputs="logits")
    as_probs = TorchClassifier(nn.Softmax(dim=1), outputs="probabilities")
    torch.testing.assert_close(log_probabilities(as_logits, logits), log_probabilities(as_probs, logits),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outputs"):
        TorchClassifier(nn.Identity(), outputs="labels")


def test_denoiser_starts_as_identity_and_freezes_its_prefix():
    den = DnCNN(depth=3, width=4)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x), x)  # zero-initialised last layer, residual output
    den.freeze_prefix().train()
    assert not den.prefix.training and den.last.training
    assert not any(p.requires_grad for p in den.prefix.parameters())
    with pytest.raises(ValueError, match="depth"):
        DnCNN(depth=1)


# ------------------------------------------------------------------ ONNX and the pipeline

@pytest.fixture(scope="module")
def tiny(tiny_defense):
    """The session's tiny pipeline (conftest.py): stages 1-2 are built once for every test module."""
    from blackbox_zo.config import resolve_config
    from problems.certified_defense import CertifiedDefenseConfig, CertifiedDefenseProblem

    stages, overrides, root = tiny_defense
    problem = CertifiedDefenseProblem()
    config = resolve_config(CertifiedDefenseConfig, problem.default_config(), None, overrides)
    return problem, config, stages, overrides, root


def test_onnx_adapter_matches_torch(tiny):
    from oracles.classifier import OnnxClassifier
    from problems.digits import make_digits_cnn

    _, config, stages, _, _ = tiny
    torch_model = make_digits_cnn(config.defense.classifier_width)
    torch_model.load_state_dict(torch.load(stages.classifier_torch, weights_only=True))
    onnx_model = OnnxClassifier(stages.classifier_onnx, max_batch=64)
    x = torch.rand(150, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch_model.eval()(x)
    out = onnx_model(x.numpy())
    assert onnx_model.queries == 150 and onnx_model.calls == 1
    # Same float32 arithmetic in another order: errors ~1e-6 on logits of O(1-10).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_training_goes_through_the_onnx_black_box_and_counts_images(tiny):
    from blackbox_zo.trainer import Trainer
    from oracles.classifier import OnnxClassifier

    problem, config, _, _, _ = tiny
    setup = problem.setup(config)
    black_box = setup.extras["black_box"]
    assert isinstance(black_box, OnnxClassifier) and setup.oracle.classifier is black_box
    assert setup.extras["label_queries"] == 1437  # pseudo-labels: one image per training image
    assert setup.oracle.space.names == ["last.weight", "last.bias"]
    summary = Trainer(setup, config, None, problem.name).fit()
    d = setup.oracle.space.dim
    assert summary["queries"]["train"] == 2 * (d + 1)  # forward CGE, two steps
    n_test = len(setup.extras["y_test"])
    eval_images = n_test * (config.defense.eval_noise_draws + 1)
    assert black_box.queries == 2 * (d + 1) * config.data.batch_size + eval_images


def test_evaluation_loss_is_eq_a2_cross_entropy_of_the_white_box_on_the_same_noise(tiny):
    """test_noisy_loss (the efficiency study's curve) against the white-box torch copy of the classifier:
    the same denoiser, the same noise draws (seeded 10,000 + run.seed), true labels."""
    problem, config, _, _, _ = tiny
    setup = problem.setup(config)
    white_box, x_te, y_te = setup.extras["white_box"], setup.extras["x_test"], setup.extras["y_test"]
    den = setup.module.eval()
    with torch.no_grad():
        den.last.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))  # not the identity
        metrics = setup.evaluate(den)
        draws = config.defense.eval_noise_draws
        gen = torch.Generator().manual_seed(10_000 + config.run.seed)
        noise = config.defense.sigma * torch.randn((draws, *x_te.shape), generator=gen)
        logits = torch.stack([white_box(den(x_te + noise[k])) for k in range(draws)])
    ref_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_te.repeat(draws)))
    # ONNX Runtime vs torch float32: logits agree to ~1e-5 (test_onnx_adapter_matches_torch)
    assert metrics["test_noisy_loss"] == pytest.approx(ref_loss, abs=1e-4)
    assert metrics["test_noisy_acc"] == pytest.approx(float((logits.argmax(-1) == y_te).float().mean()), abs=1e-3)


def test_experiment_end_to_end_at_toy_size(tiny, tmp_path):
    from problems.certified_defense.experiment import main

    _, _, _, overrides, _ = tiny
    args = ["--out", str(tmp_path), "--n", "60", "--n0", "10", "--test-size", "12", "--threads", "1",
            "--grasp-per-class", "1", "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert [r["key"] for r in rows] == ["none", "mse", "fo", "zo"]
    for r in rows:
        ca = [float(r[f"ca@{x}"]) for x in ("0", "0.25", "0.5", "0.75")]
        assert all(0 <= a <= 1 for a in ca) and ca == sorted(ca, reverse=True)
        # N = 60 at alpha 0.001 certifies at most sigma * Phi^-1(0.001^(1/60)) = 0.31 < 0.5
        assert ca[2] == 0.0
        assert int(r["black_box_images"]) == 12 * (10 + 60)  # N0 + N per test point
    points = list(csv.DictReader(open(tmp_path / "certify_zo.csv")))
    assert len(points) == 12 and sorted({int(p["label"]) for p in points}) == list(range(10))
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 0
    assert main(["--n", "0"]) == 2  # bad input: one line naming the option, exit 2


def test_zo_grasp_sparsity_hook_charges_prune_queries_and_keeps_biases(tiny):
    problem, config, _, _, _ = tiny
    sparse = SparsityConfig(q=4, sparsity=0.5, samples_per_class=2)
    setup = problem.setup(config.model_copy(update={"sparsity": sparse}))
    report = setup.extras["sparsity"]
    assert report["prune_queries"] == 2 * (4 + 1) == setup.oracle.ledger.counts["prune"]  # eq. (3): two RGEs
    coords = setup.coord_sampler.coords(0)
    w, b = setup.oracle.space["last.weight"], setup.oracle.space["last.bias"]
    assert int(((coords >= w.offset) & (coords < w.stop)).sum()) == round(0.5 * w.numel)
    assert set(range(b.offset, b.stop)) <= set(coords.tolist())  # 1-D blocks stay dense


def test_stage_cache_key_separates_torch_thread_counts(tiny):
    """The first-order stages differ bitwise with torch's thread count, so their cache must too: a
    1-thread run may not pick up a stage a 2-thread run trained (and the same count finds its own)."""
    from problems.certified_defense import stage_directory

    _, config, _, _, _ = tiny
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_again = stage_directory(config), stage_directory(config)
        torch.set_num_threads(2)
        two = stage_directory(config)
    finally:
        torch.set_num_threads(before)
    assert one == one_again
    assert one != two and one.parent == two.parent
