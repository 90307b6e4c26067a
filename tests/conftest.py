import os

import pytest
import torch

# Tests are small; more threads than cores only adds noise on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def quadratic():
    """f(theta) = 1/2 theta^T A theta + b^T theta in float64, with its exact gradient."""
    from helpers import QuadraticOracle

    gen = torch.Generator().manual_seed(0)
    d = 12
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    return QuadraticOracle(a, b)
