"""problems.digits reads scikit-learn's digits and splits them without importing scikit-learn:
the data and the split must equal scikit-learn's own, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from problems.digits import load_digits_split, stratified_split

ROOT = Path(__file__).resolve().parents[1]


def sklearn_split(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           stratify=y.numpy(), random_state=seed)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@pytest.mark.parametrize("seed,test_fraction", [(0, 0.2), (1, 0.2), (7, 0.25), (3, 0.1), (123, 0.33)])
def test_digits_split_equals_scikit_learn(seed, test_fraction):
    ours = load_digits_split(seed, test_fraction)
    ref = sklearn_split(seed, test_fraction)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 5])
def test_stratified_split_with_ties_equals_scikit_learn(seed):
    # counts whose proportional shares tie in their remainders: the tie-break draws from the RandomState
    from sklearn.model_selection import train_test_split

    y = np.repeat(np.arange(7), [5, 5, 5, 6, 6, 9, 3])
    ours = stratified_split(y, 0.3, seed)
    ref = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
    for a, b in zip(ours, ref):
        assert np.array_equal(a, b)


def test_loading_digits_does_not_import_scikit_learn():
    code = ("import sys; from problems.digits import load_digits_split; load_digits_split(0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_test_fraction_is_refused():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(0, 1.0)
