"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter 2019, Algorithm "CERTIFY"/"PREDICT").

The smoothed classifier g(x) = argmax_c P_{eps ~ N(0, sigma^2 I)}[ base(x + eps) = c ] is
certifiably robust: if the top class has probability at least p_A (a one-sided
Clopper-Pearson lower bound at level alpha), g is constant in the l2 ball of radius

    R = sigma * Phi^{-1}(p_A)                         (Cohen et al. 2019, Theorem 1 with p_B = 1 - p_A)

The base classifier only has to return labels for a batch of images, so it can be a
black box (an ONNX session) composed with a denoiser (denoised smoothing, Salman et al.
2020). Monte Carlo samples are drawn in batches of `batch_size`.

The largest radius N samples can ever certify (all N votes for one class) is
sigma * Phi^{-1}(alpha^{1/N}); `max_certifiable_radius` and `samples_needed` compute it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "ABSTAIN",
    "clopper_pearson_lower",
    "max_certifiable_radius",
    "samples_needed",
    "sample_counts",
    "certify",
    "predict",
    "CertifyResult",
    "certify_dataset",
    "certified_accuracy",
]

ABSTAIN = -1
BasePredict = Callable[[Tensor], Tensor]  # [M, *shape] images -> [M] integer labels


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound of a binomial proportion.

    = Beta quantile B(alpha; k, n - k + 1), and 0 for k = 0 (Cohen et al.'s LowerConfBound,
    which calls statsmodels' two-sided "beta" interval at level 2 alpha: the same number).
    """
    from scipy.stats import beta

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """sigma * Phi^{-1}(alpha^{1/n}): the radius when all n samples vote for the top class."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def samples_needed(radius: float, sigma: float, alpha: float) -> int:
    """Smallest n with max_certifiable_radius(sigma, n, alpha) >= radius."""
    from scipy.stats import norm

    p = norm.cdf(radius / sigma)
    n = math.ceil(math.log(alpha) / math.log(p))
    while max_certifiable_radius(sigma, n, alpha) < radius:  # guard against rounding at the boundary
        n += 1
    return n


def sample_counts(
    base_predict: BasePredict,
    x: Tensor,
    sigma: float,
    num: int,
    num_classes: int,
    batch_size: int,
    generator: torch.Generator,
) -> np.ndarray:
    """Votes of base(x + eps) over `num` Gaussian samples, drawn `batch_size` at a time -> counts [C]."""
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = int(num)
    while remaining > 0:
        m = min(batch_size, remaining)
        noise = sigma * torch.randn((m, *x.shape), generator=generator, dtype=x.dtype)
        labels = base_predict(x.unsqueeze(0) + noise)
        counts += np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=num_classes)[:num_classes]
        remaining -= m
    return counts


def certify(
    base_predict: BasePredict,
    x: Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    num_classes: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: (class, radius), or (ABSTAIN, 0.0).

    n0 samples select the top class c_A; n fresh samples estimate its probability; if the
    Clopper-Pearson lower bound p_A is at most 1/2 the smoothed classifier abstains,
    otherwise it returns c_A with radius sigma * Phi^{-1}(p_A).
    """
    from scipy.stats import norm

    _check(sigma, alpha, n0=n0, n=n)
    gen = generator or torch.Generator().manual_seed(0)
    select = sample_counts(base_predict, x, sigma, n0, num_classes, batch_size, gen)
    c_a = int(select.argmax())
    estimate = sample_counts(base_predict, x, sigma, n, num_classes, batch_size, gen)
    p_a = clopper_pearson_lower(int(estimate[c_a]), n, alpha)
    if p_a <= 0.5:
        return ABSTAIN, 0.0
    return c_a, float(sigma * norm.ppf(p_a))


def predict(
    base_predict: BasePredict,
    x: Tensor,
    sigma: float,
    n: int,
    alpha: float,
    num_classes: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> int:
    """Cohen et al.'s PREDICT: the top class if a two-sided binomial test of n_A vs n_B at
    p = 1/2 rejects at level alpha, else ABSTAIN (so a tie always abstains)."""
    from scipy.stats import binomtest

    _check(sigma, alpha, n=n)
    gen = generator or torch.Generator().manual_seed(0)
    counts = sample_counts(base_predict, x, sigma, n, num_classes, batch_size, gen)
    top2 = np.argsort(-counts, kind="stable")[:2]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
    if n_a + n_b == 0 or binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2[0])


def _check(sigma: float, alpha: float, **sizes: int) -> None:
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class CertifyResult:
    labels: np.ndarray  # true labels [M]
    predictions: np.ndarray  # certified class or ABSTAIN [M]
    radii: np.ndarray  # certified radius (0 when abstaining) [M]
    seconds: float
    base_queries: int  # images sent to the base classifier

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    def accuracy_at(self, radii: Sequence[float]) -> list[float]:
        return [certified_accuracy(self.predictions, self.labels, self.radii, r) for r in radii]


def certified_accuracy(predictions: np.ndarray, labels: np.ndarray, radii: np.ndarray, r: float) -> float:
    """Fraction certified correct with radius >= r (abstentions count as wrong)."""
    predictions, labels, radii = map(np.asarray, (predictions, labels, radii))
    ok = (predictions == labels) & (predictions != ABSTAIN) & (radii >= r)
    return float(ok.mean()) if ok.size else float("nan")


def certify_dataset(
    base_predict: BasePredict,
    images: Tensor,
    labels: Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    num_classes: int,
    batch_size: int = 1000,
    seed: int = 0,
    query_counter: Callable[[], int] | None = None,
    progress: bool = False,
    desc: str = "certify",
) -> CertifyResult:
    """CERTIFY every image; point i uses its own generator seeded by (seed, i), so results do
    not depend on the order or on a subset being run, and two base classifiers certified with
    the same seed see the same noise draws (a paired comparison)."""
    preds = np.empty(len(images), dtype=np.int64)
    radii = np.empty(len(images), dtype=np.float64)
    q0 = query_counter() if query_counter else 0
    start = time.perf_counter()
    iterator = range(len(images))
    if progress:
        iterator = tqdm(iterator, desc=desc, dynamic_ncols=True, leave=False)
    with torch.no_grad():
        for i in iterator:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            preds[i], radii[i] = certify(base_predict, images[i], sigma, n0, n, alpha, num_classes, batch_size, gen)
    return CertifyResult(
        labels=np.asarray(labels, dtype=np.int64),
        predictions=preds,
        radii=radii,
        seconds=time.perf_counter() - start,
        base_queries=(query_counter() - q0) if query_counter else (n0 + n) * len(images),
    )
