"""Small oracles with known gradients, shared by the tests."""

import torch

from blackbox_zo.oracle import Oracle, ParamSpace


class QuadraticOracle(Oracle):
    name = "quadratic"

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.space = ParamSpace([("theta", (a.shape[0],))])
        self.rows_evaluated = 0

    def losses(self, thetas, batch):
        self.rows_evaluated += thetas.shape[0]
        return 0.5 * torch.einsum("pi,ij,pj->p", thetas, self.a, thetas) + thetas @ self.b

    def grad(self, theta):
        return self.a @ theta + self.b

    def initial_theta(self):
        return torch.linspace(-1, 1, self.space.dim, dtype=torch.float64)


class SmoothBlocks(Oracle):
    """f(theta) = sum log cosh(theta - c) + 1/2 theta^T A theta in float64 over three blocks (d = 40):
    smooth, not quadratic, with an exact gradient; every row of a batch is evaluated on its own
    (no cross-row reduction), so a loss does not depend on which other points share its call."""

    name = "smooth-blocks"

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.space = ParamSpace([("w1", (4, 5)), ("b1", (4,)), ("w2", (16,))])
        d = self.space.dim
        m = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.a = m @ m.T / d
        self.c = torch.randn(d, generator=gen, dtype=torch.float64)
        self.calls: list[tuple[str, int]] = []

    def losses(self, thetas, batch):
        self.calls.append(("losses", thetas.shape[0]))
        z = thetas - self.c
        return torch.log(torch.cosh(z)).sum(1) + 0.5 * ((thetas @ self.a) * thetas).sum(1)

    def coordinate_losses(self, theta, coords, mu, batch):
        self.calls.append(("coordinate_losses", coords.numel()))
        return super().coordinate_losses(theta, coords, mu, batch)

    def grad(self, theta):
        return torch.tanh(theta - self.c) + self.a @ theta

    def initial_theta(self):
        return torch.linspace(-1, 1, self.space.dim, dtype=torch.float64)


class LinearLayerOracle(Oracle):
    """A white-box linear layer behind a smooth loss: theta = [W (4 x 5), b (4)] of "fc", fixed inputs H (6 x 5),
    loss = mean_i sum_k log cosh((W h_i + b - t_i)_k) in float64; `layer_inputs` hands out H (subspace CGE).
    Every row of a batch is evaluated on its own."""

    name = "linear-layer"

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.space = ParamSpace([("fc.weight", (4, 5)), ("fc.bias", (4,))])
        self.h = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        self.t = torch.randn(6, 4, generator=gen, dtype=torch.float64)

    def losses(self, thetas, batch):
        w = thetas[:, :20].reshape(-1, 4, 5)
        z = torch.einsum("pkj,ij->pik", w, self.h) + thetas[:, None, 20:]
        return torch.log(torch.cosh(z - self.t)).sum(2).mean(1)

    def layer_inputs(self, theta, batch, name):
        if name != "fc":
            raise ValueError(f"no linear layer {name!r}")
        return self.h

    def initial_theta(self):
        return torch.linspace(-1, 1, self.space.dim, dtype=torch.float64)
