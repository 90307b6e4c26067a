"""The denoised-smoothing oracle: DeepZero eq. (A2) through a query-only classifier.

    minimize_theta  E_{delta, x} [ CE( f(D_theta(x + delta)), argmax f(x) ) ],  delta ~ N(0, sigma^2 I)   (A2)

f is a `BlackBoxClassifier` (scores only); D is a DnCNN denoiser (Zhang et al. 2017) that
we own. As in DeepZero Appx. G ("partial fine-tuning"), theta is by default only the last
convolution of D: the frozen prefix is evaluated once per step and its features are
reused by every perturbation (feature reuse), so a step costs what the black box costs.

A batch is `DefenseBatch(x, labels, delta)`: labels are the black box's own predictions
on clean x (pseudo-labels, no ground truth needed), delta is drawn once per batch by the
batch source and shared by every perturbation of the step (common random numbers), so
`losses` is a deterministic function of (theta, batch).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from blackbox_zo.oracle import Oracle, ParamSpace

from .classifier import BlackBoxClassifier, TorchClassifier, log_probabilities

__all__ = ["DnCNN", "DefenseBatch", "DenoisedSmoothingOracle", "NoisyBatches", "denoised_smoothing_loss"]


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017): conv-ReLU, (depth-2) x conv-[BN]-ReLU, conv; residual output.

    D(x) = x - last(prefix(x)): the network predicts the noise and subtracts it. The last
    convolution is zero-initialised, so a fresh D is exactly the identity. The reference
    (Salman et al. 2020; DeepZero Appx. G) has depth 17, width 64, batch norm.
    `freeze_prefix()` fixes everything but the last layer (and keeps its batch norms in eval
    mode even under `.train()`), which is what ZO fine-tuning and feature reuse need.
    """

    def __init__(self, channels: int = 1, depth: int = 17, width: int = 64, batch_norm: bool = True):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN depth must be >= 2, got {depth}")
        if width < 1 or channels < 1:
            raise ValueError(f"DnCNN width and channels must be >= 1, got width={width}, channels={channels}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
        self.prefix = nn.Sequential(*layers)
        self.last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)
        self.prefix_frozen = False

    def features(self, x: Tensor) -> Tensor:
        return self.prefix(x)

    def head(self, x: Tensor, features: Tensor) -> Tensor:
        return x - self.last(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x, self.features(x))

    def freeze_prefix(self) -> "DnCNN":
        for p in self.prefix.parameters():
            p.requires_grad_(False)
        self.prefix_frozen = True
        self.prefix.eval()
        return self

    def train(self, mode: bool = True) -> "DnCNN":
        super().train(mode)
        if self.prefix_frozen:
            self.prefix.eval()  # frozen batch norms must not drift with the fine-tuning batches
        return self

    @property
    def last_layer_names(self) -> list[str]:
        return ["last.weight", "last.bias"]


class DefenseBatch(NamedTuple):
    x: Tensor  # clean images [B, C, H, W]
    labels: Tensor  # argmax f(x), the black box's own predictions [B]
    delta: Tensor  # Gaussian noise [B, C, H, W], one draw shared by every perturbation


class NoisyBatches:
    """Wraps a batch source of (x, labels) and adds delta ~ N(0, sigma^2 I) per batch.

    delta is a pure function of (seed, epoch, index), so a resumed run sees the noise an
    uninterrupted one would.
    """

    def __init__(self, source: Any, sigma: float, seed: int = 0):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.source, self.sigma, self.seed = source, float(sigma), int(seed)

    def num_batches(self, epoch: int) -> int:
        return self.source.num_batches(epoch)

    def batch(self, epoch: int, index: int) -> DefenseBatch:
        x, labels = self.source.batch(epoch, index)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % 2**62)
        delta = self.sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return DefenseBatch(x, labels, delta)


def denoised_smoothing_loss(log_probs: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of eq. (A2) from log-probabilities [..., B, C] and labels [B] -> [...]."""
    picked = log_probs.gather(-1, labels.expand(*log_probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return -picked.mean(-1)


class DenoisedSmoothingOracle(Oracle):
    """Eq. (A2) as loss values of the denoiser's trainable part theta.

    `trainable` names the denoiser parameters that make up theta; the default (and the
    only case with feature reuse) is the last convolution, `["last.weight", "last.bias"]`.
    Any other choice falls back to one `functional_call` of the whole denoiser per theta.

    With the last layer trainable, P parameter vectors are evaluated as one convolution:
    the P weight sets are stacked as P*C output channels over the cached prefix features,
    so the prefix runs once per batch, not once per perturbation; the P*B denoised images
    then go to the black box in calls of at most `max_images_per_call` images.

    One loss value is one query of the engine's ledger; the black box separately counts
    the images it is sent (`classifier.queries`): B per loss value.
    """

    name = "denoised-smoothing-v1"

    def __init__(
        self,
        denoiser: DnCNN,
        classifier: BlackBoxClassifier,
        trainable: Sequence[str] | None = None,
        *,
        feature_reuse: bool = True,
        memory_cap_bytes: int | None = None,
        max_images_per_call: int = 16384,
        example_image_size: tuple[int, int] = (8, 8),
    ):
        if not isinstance(denoiser, DnCNN):
            raise TypeError(f"denoiser must be a DnCNN, got {type(denoiser).__name__}")
        if max_images_per_call < 1:
            raise ValueError(f"max_images_per_call must be >= 1, got {max_images_per_call}")
        self.denoiser = denoiser
        self.classifier = classifier
        names = list(trainable) if trainable is not None else denoiser.last_layer_names
        params = dict(denoiser.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"trainable names {unknown} are not parameters of the denoiser")
        self.space = ParamSpace((n, tuple(params[n].shape)) for n in names)
        # Feature reuse needs theta to be exactly the last layer (the prefix is then constant).
        self.feature_reuse = bool(feature_reuse) and sorted(names) == sorted(denoiser.last_layer_names)
        if self.feature_reuse:
            denoiser.freeze_prefix()
        self.max_images_per_call = int(max_images_per_call)
        self.example_image_size = tuple(example_image_size)  # only for example_batch()
        if memory_cap_bytes is not None:
            self.memory_cap_bytes = int(memory_cap_bytes)
        self._cache_key: tuple | None = None
        self._cache_features: Tensor | None = None
        self._keep_alive: tuple | None = None
        self.prefix_evaluations = 0  # how often the frozen prefix ran (feature-reuse check)

    # -- feature reuse -------------------------------------------------------------------

    def _features(self, noisy: Tensor, batch: DefenseBatch) -> Tensor:
        key = (id(batch.x), id(batch.delta), batch.x._version, batch.delta._version, tuple(batch.x.shape))
        if self._cache_key != key or self._cache_features is None:
            with torch.no_grad():
                self._cache_features = self.denoiser.features(noisy)
            self._cache_key = key
            self._keep_alive = (batch.x, batch.delta)  # ids stay unique while cached
            self.prefix_evaluations += 1
        return self._cache_features

    def clear_cache(self) -> None:
        self._cache_key, self._cache_features, self._keep_alive = None, None, None

    # -- the oracle ----------------------------------------------------------------------

    def denoise(self, thetas: Tensor, batch: DefenseBatch) -> Tensor:
        """D_theta(x + delta) for every theta: [P, d] -> [P, B, C, H, W]."""
        x, _, delta = batch
        noisy = x + delta
        if self.feature_reuse:
            feats = self._features(noisy, batch)  # [B, W, H, W]
            views = self.space.views(thetas)
            weight = views["last.weight"]  # [P, C, W, 3, 3]
            bias = views["last.bias"]  # [P, C]
            p, c = weight.shape[:2]
            last = self.denoiser.last
            residual = nn.functional.conv2d(
                feats, weight.reshape(p * c, *weight.shape[2:]), bias.reshape(p * c), padding=last.padding
            )  # [B, P*C, H, W]
            residual = residual.view(noisy.shape[0], p, c, *residual.shape[2:]).transpose(0, 1)
            return noisy.unsqueeze(0) - residual
        fixed = {n: t.detach() for n, t in self.denoiser.named_parameters() if n not in self.space.names}
        fixed.update(dict(self.denoiser.named_buffers()))
        # Batch norms use their (pretrained) running statistics: a loss value must not depend
        # on the other images of the batch, nor update any state.
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            outs = [functional_call(self.denoiser, {**fixed, **self.space.views(t)}, (noisy,)) for t in thetas]
        finally:
            self.denoiser.train(was_training)
        return torch.stack(outs)

    def losses(self, thetas: Tensor, batch: DefenseBatch) -> Tensor:
        x, labels, _ = batch
        b = x.shape[0]
        per_call = max(1, self.max_images_per_call // max(1, b))
        out = []
        for start in range(0, thetas.shape[0], per_call):
            denoised = self.denoise(thetas[start : start + per_call], batch)  # [P, B, C, H, W]
            p = denoised.shape[0]
            logp = log_probabilities(self.classifier, denoised.reshape(p * b, *x.shape[1:]))
            out.append(denoised_smoothing_loss(logp.view(p, b, -1), labels))
        return torch.cat(out)

    def initial_theta(self) -> Tensor:
        return self.space.flatten_module(self.denoiser)

    def example_batch(self) -> DefenseBatch:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(8, *self._input_shape(), generator=gen)
        with torch.no_grad():
            labels = self.classifier(x).argmax(-1)
        return DefenseBatch(x, labels, 0.25 * torch.randn(x.shape, generator=gen))

    def _input_shape(self) -> tuple[int, int, int]:
        return (self.denoiser.last.out_channels, *self.example_image_size)

    @staticmethod
    def example() -> tuple["DenoisedSmoothingOracle", DefenseBatch]:
        """A small self-contained instance (random classifier) for `check-oracle`."""
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        denoiser = DnCNN(channels=1, depth=3, width=4, batch_norm=False)
        with torch.no_grad():
            denoiser.last.weight.normal_(0, 0.05, generator=gen)
        oracle = DenoisedSmoothingOracle(denoiser, TorchClassifier(classifier))
        return oracle, oracle.example_batch()
