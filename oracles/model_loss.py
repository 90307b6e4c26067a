"""The loss of a torch module on a batch (x, y), as a value-only function of its parameters."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from blackbox_zo.oracle import Oracle, ParamSpace, coordinate_losses_in_chunks
from blackbox_zo.population import NotBatchableError, PopulationForward
from blackbox_zo.reuse import FeatureReuse, NotStageableError

__all__ = ["ModelLossOracle"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)

# On a CPU the population forward runs in chunks whose largest activation stays below this (feature
# reuse's `cpu_chunk_bytes`): below glibc's mmap threshold as runtime.tune_allocator sets it, so a
# chunk's tensors come from the reused heap instead of fresh zero pages, and nearer the cache.
# ZO-GraSP's 386 forwards on 250 digits images: 1.7x faster than chunks of 65 members (66 MB each).
POPULATION_CPU_CHUNK_BYTES = 32 * 2**20


class ModelLossOracle(Oracle):
    """loss_fn(module(x; theta), y) for P parameter vectors at once (functional_call + vmap).

    Norm layers in training mode normalise with the batch's own statistics; their
    running statistics are updated only by `on_step` (once per step, unperturbed),
    never by a perturbed evaluation.

    Feature reuse (`blackbox_zo.reuse`, DeepZero Sec. 5): when the module is staged
    (`feature_reuse=None`: on for an nn.Sequential; True: any module torch.fx can trace;
    False: off), `coordinate_losses` re-runs only what a coordinate changes, and the
    unperturbed forward is computed once per step and shared by `on_step`, the base
    query of forward CGE (`losses` with one parameter vector) and the coordinate
    queries. Sharing it changes no accounting: each loss value still passes through
    `query`/`query_coordinates` and is charged to the ledger there.

    Populations (`losses` with P parameter vectors: RGE, evolution strategies, sep-CMA-ES)
    run through `blackbox_zo.population.PopulationForward` when the module is an
    nn.Sequential of layers it knows (grouped convolutions, batched matrix products;
    `population=None`: on when possible, False: the vmapped path), else through vmap.
    """

    name = "model-loss-v1"

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        memory_cap_bytes: int | None = None,
        feature_reuse: bool | None = None,
        reuse_granularity: Literal["layer", "stage"] = "layer",
        population: bool | None = None,
    ):
        self.module = module
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.space = ParamSpace.from_module(module)
        self._param_names = set(self.space.names)
        if memory_cap_bytes is not None:
            if memory_cap_bytes < 1:
                raise ValueError(f"memory_cap_bytes must be >= 1, got {memory_cap_bytes}")
            self.memory_cap_bytes = int(memory_cap_bytes)
        self._activation_bytes: dict[tuple, int] = {}
        self.population: PopulationForward | None = None
        if population is None or population:
            try:
                self.population = PopulationForward(module, self.space)
            except NotBatchableError:
                if population:
                    raise
        self.reuse: FeatureReuse | None = None
        if feature_reuse is None:
            feature_reuse = isinstance(module, nn.Sequential)
            required = False
        else:
            required = bool(feature_reuse)
        if feature_reuse:
            try:
                self.reuse = FeatureReuse(module, self.space, self.loss_fn, granularity=reuse_granularity,
                                          memory_cap_bytes=self.memory_cap_bytes,
                                          fallback=self._reference_coordinate_losses)
            except NotStageableError as exc:
                if required:
                    raise
                warnings.warn(f"feature reuse off for this module: {exc}", RuntimeWarning, stacklevel=2)

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

    def base_loss(self, theta: Tensor, batch: Any) -> Tensor:
        if self.reuse is not None:  # the cached unperturbed forward that the coordinate queries reuse
            return self.reuse.base_loss(theta, batch).reshape(1)
        return self.losses(theta.unsqueeze(0), batch)

    def losses(self, thetas: Tensor, batch: Any) -> Tensor:
        if self.population is not None:
            return self._population_losses(thetas, batch)
        return self._vmapped_losses(thetas, batch)

    def _population_losses(self, thetas: Tensor, batch: Any) -> Tensor:
        x, y = batch
        chunk = self._vmap_chunk(thetas[0], x)
        if thetas.device.type == "cpu":  # members never meet in a kernel: no loss changes by a bit (tests)
            largest = self._activation_bytes[(tuple(x.shape), x.dtype, str(x.device))]
            chunk = min(chunk, max(1, POPULATION_CPU_CHUNK_BYTES // max(1, largest)))
        return torch.cat([self.population.losses(thetas[i : i + chunk], x, y, self.loss_fn)
                          for i in range(0, thetas.shape[0], chunk)])

    def _vmapped_losses(self, thetas: Tensor, batch: Any) -> Tensor:
        x, y = batch
        fixed = {**self._frozen_params(), **self._buffers()}
        views = self.space.views(thetas)  # {name: [P, *shape]} views, no copy

        def one(params: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.module, {**fixed, **params}, (x,), strict=False)
            return self.loss_fn(out, y)

        chunk = self._vmap_chunk(thetas[0], x)
        return torch.cat([vmap(one)({k: v[i : i + chunk] for k, v in views.items()}) for i in range(0, thetas.shape[0], chunk)])

    def coordinate_losses(self, theta: Tensor, coords: Tensor, mu: float, batch: Any) -> Tensor:
        if self.reuse is not None:
            return self.reuse.coordinate_losses(theta, coords, mu, batch)
        return self._reference_coordinate_losses(theta, coords, mu, batch)

    def _reference_coordinate_losses(self, theta: Tensor, coords: Tensor, mu: float, batch: Any) -> Tensor:
        """The default chunked path of `Oracle.coordinate_losses`, on the vmapped forward."""
        return coordinate_losses_in_chunks(self._vmapped_losses, theta, coords, mu, batch,
                                           self._vmap_chunk(theta, batch[0]))

    def chunk_size(self, theta: Tensor) -> int:
        # vmap materialises P copies of every activation, not only of theta: bound by both
        # (the activation size is known once a batch has been seen).
        per_theta = theta.numel() * theta.element_size() + 4 * max(self._activation_bytes.values(), default=0)
        return max(1, min(self.memory_cap_bytes // max(1, per_theta), 256))

    def _vmap_chunk(self, theta: Tensor, x: Tensor) -> int:
        key = (tuple(x.shape), x.dtype, str(x.device))
        if key not in self._activation_bytes:
            self._activation_bytes[key] = self._largest_activation_bytes(x)
        per_theta = theta.numel() * theta.element_size() + 4 * self._activation_bytes[key]
        return max(1, min(self.memory_cap_bytes // max(1, per_theta), 256))

    def _largest_activation_bytes(self, x: Tensor) -> int:
        """Bytes of the largest module output for the whole batch, measured on two samples
        (one would break batch norm in training mode on [N, C] inputs)."""
        sizes: list[int] = []

        def hook(_m, _inp, out):
            if isinstance(out, Tensor):
                sizes.append(out.numel() * out.element_size())

        handles = [m.register_forward_hook(hook) for m in self.module.modules()]
        try:
            with torch.no_grad():
                fixed = {**self._frozen_params(), **self._buffers()}
                params = {n: p.detach() for n, p in self.module.named_parameters()}
                functional_call(self.module, {**params, **fixed}, (x[:2],), strict=False)
        except Exception:  # a module that cannot run on one sample: bound by theta alone
            return 0
        finally:
            for h in handles:
                h.remove()
        return max(sizes, default=0) * x.shape[0] // min(2, x.shape[0])

    def on_step(self, theta: Tensor, batch: Any) -> None:
        if not any(isinstance(m, _NORM_TYPES) and m.training for m in self.module.modules()):
            return
        if self.reuse is not None:  # one unperturbed forward: updates the statistics and is cached
            self.reuse.prepare(theta, batch, update_running_stats=True)
            return
        x, _ = batch
        with torch.no_grad():
            params = {k: v for k, v in self.space.views(theta).items()}
            functional_call(self.module, params, (x,), strict=False)

    def initial_theta(self) -> Tensor:
        return self.space.flatten_module(self.module)

    # -- a white-box model behind a black-box loss: what a linear layer sees (blackbox_zo.subspace) -------

    def check_linear_layer(self, name: str) -> nn.Linear:
        """The nn.Linear named `name`; ValueError (one line) when the module has none of that name."""
        layer = dict(self.module.named_modules()).get(name)
        if not isinstance(layer, nn.Linear):
            what = "no such module" if layer is None else type(layer).__name__
            raise ValueError(f"layer {name!r} is not an nn.Linear of the model ({what}); subspace-cge needs one")
        return layer

    def layer_inputs(self, theta: Tensor, batch: Any, name: str) -> Tensor:
        """The inputs [rows, in] of the nn.Linear `name` at parameters theta on batch (x, y), leading dimensions
        flattened into rows; no query (no loss value). With the population forward this is its shared prefix,
        kept for the perturbed queries of the same step (those that perturb this layer or later ones only);
        otherwise one forward of the module to the layer (a hook stops it there). Read only."""
        layer = self.check_linear_layer(name)
        x = batch[0]
        with torch.no_grad():
            if self.population is not None:
                inputs = self.population.layer_input(theta, x, name)
            else:
                inputs = self._inputs_by_hook(layer, theta, x)
        return inputs.reshape(-1, inputs.shape[-1])

    def _inputs_by_hook(self, layer: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
        seen: list[Tensor] = []

        class _Reached(Exception):
            pass

        def hook(_m, args):
            seen.append(args[0])
            raise _Reached

        handle = layer.register_forward_pre_hook(hook)
        try:
            functional_call(self.module, {**self._frozen_params(), **self._buffers(), **self.space.views(theta)},
                            (x,), strict=False)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ValueError("the forward never reached the layer")
        return seen[0]

    @classmethod
    def example(cls) -> tuple["ModelLossOracle", Any]:
        """A small staged CNN with batch norm and a batch, for `blackbox-zo check-oracle model-loss-v1`
        (its coordinate check exercises the feature-reuse path against `losses`)."""
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
        batch = (torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        return cls(module), batch
