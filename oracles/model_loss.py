"""The loss of a torch module on a batch (x, y), as a value-only function of its parameters."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from blackbox_zo.oracle import Oracle, ParamSpace, register_oracle

__all__ = ["ModelLossOracle"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@register_oracle("model-loss-v1")
class ModelLossOracle(Oracle):
    """loss_fn(module(x; theta), y) for P parameter vectors at once (functional_call + vmap).

    Norm layers in training mode normalise with the batch's own statistics; their
    running statistics are updated only by `on_step` (once per step, unperturbed),
    never by a perturbed evaluation.
    """

    name = "model-loss-v1"

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        memory_cap_bytes: int | None = None,
    ):
        self.module = module
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.space = ParamSpace.from_module(module)
        self._param_names = set(self.space.names)
        if memory_cap_bytes is not None:
            self.memory_cap_bytes = int(memory_cap_bytes)

    # Buffers passed to functional_call: norm layers in training mode get None for their
    # running statistics, so F.batch_norm uses batch statistics and updates nothing.
    def _buffers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mname, mod in self.module.named_modules():
            prefix = f"{mname}." if mname else ""
            for bname, buf in mod.named_buffers(recurse=False):
                frozen = isinstance(mod, _NORM_TYPES) and mod.training
                out[prefix + bname] = None if frozen else buf
        return out

    def _frozen_params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters() if n not in self._param_names}

    def losses(self, thetas: Tensor, batch: Any) -> Tensor:
        x, y = batch
        fixed = {**self._frozen_params(), **self._buffers()}
        views = self.space.views(thetas)  # {name: [P, *shape]} views, no copy

        def one(params: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.module, {**fixed, **params}, (x,), strict=False)
            return self.loss_fn(out, y)

        chunk = max(1, self.chunk_size(thetas[0]))
        return torch.cat([vmap(one)({k: v[i : i + chunk] for k, v in views.items()}) for i in range(0, thetas.shape[0], chunk)])

    def chunk_size(self, theta: Tensor) -> int:
        # vmap materialises P copies of every activation, not only of theta: bound by both.
        return max(1, min(super().chunk_size(theta), 256))

    def on_step(self, theta: Tensor, batch: Any) -> None:
        if not any(isinstance(m, _NORM_TYPES) and m.training for m in self.module.modules()):
            return
        x, _ = batch
        with torch.no_grad():
            params = {k: v for k, v in self.space.views(theta).items()}
            functional_call(self.module, params, (x,), strict=False)

    def initial_theta(self) -> Tensor:
        return self.space.flatten_module(self.module)
