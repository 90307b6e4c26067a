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
