"""Exact batched forward of a population: P parameter vectors of one nn.Sequential on one shared batch.

Population methods (evolution strategies, RGE, sep-CMA-ES) evaluate P full models on the
same batch. `torch.func.vmap` over the parameters does this, but on a CPU it turns every
convolution into a generic batched one and runs at 0.7x to 0.9x a plain Python loop
(docs/results.md, bench_cge). This module writes the population forward by hand, with the
layouts that the fast kernels want:

* the first layer sees the shared input once: a convolution with P * C_out output channels
  (all members' filters stacked), a linear layer as one matrix product [N, F] x [F, P * out];
* later convolutions are grouped, `groups = P` (times the layer's own groups), on
  activations laid out [N, P * C, H, W], in channels-last memory order (measured faster
  for grouped convolutions and for the pooling after them);
* linear layers on per-member features [P, N, F] are one batched product (`baddbmm`);
* per-channel operations (activations, pooling, batch norm with per-member affine
  parameters and statistics) run on the grouped layout unchanged: each member's channels
  are separate channels;
* the loss is `torch.vmap` of the user's loss over the P outputs (cheap: no parameters).

* a layer whose parameters are the same in every member (outside the space, or inside it but
  not perturbed: ES / sep-CMA-ES on the later layers only, a coordinate subset that leaves the
  first layers alone) is computed once while its input is still shared: the prefix of
  unperturbed layers runs once per batch, and the first perturbed convolution after it is
  one dense convolution with P * C_out output channels rather than a grouped one; the prefix's
  output is kept for the next call on the same batch (a plan executed in chunks);
* ReLU runs in place on the activations this forward made itself (not on the caller's input),
  and a 4-D input of the first per-member convolution is laid out channels-last, so that its
  output, the ReLU and the next grouped convolution need no layout copy.

Three layouts flow between layers: "shared" [N, ...] (not yet perturbed: the same for every
member), "channels" [N, P * C, *spatial] and "batch" [P, N, ...]. Supported layers:
Conv1d/2d/3d (zero padding), Linear, Flatten (from dim 1), BatchNorm1d/2d/3d, pooling,
elementwise activations, Dropout in eval mode or with p = 0, and any parameter-free layer
before the first perturbed one. Anything else raises `NotBatchableError` at construction,
and the caller (ModelLossOracle) keeps its vmapped path.

Exact: every member computes the operations of the plain forward with its own parameters;
only the order of floating-point additions inside the kernels differs. Tests check 1e-5
(float32) and 1e-10 (float64) against a loop of plain forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .oracle import ParamSpace

__all__ = ["PopulationForward", "NotBatchableError"]


class NotBatchableError(ValueError):
    """The module has a layer the population forward does not know; use the vmapped path."""


_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
                nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
                nn.Identity)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _Act:
    """An activation in one of the three layouts (see the module docstring)."""

    t: Tensor
    layout: str  # "shared" | "channels" | "batch"
    owned: bool = False  # made by this forward (may be overwritten in place), not the caller's input or a view of it


def _to_batch(a: _Act, p: int) -> Tensor:
    """[P, N, ...] (a copy only when the layout needs one)."""
    if a.layout == "batch":
        return a.t
    if a.layout == "shared":
        return a.t.unsqueeze(0).expand(p, *a.t.shape)
    n, pc = a.t.shape[:2]
    return a.t.reshape(n, p, pc // p, *a.t.shape[2:]).transpose(0, 1)


def _to_channels(a: _Act, p: int) -> Tensor:
    """[N, P * C, ...]."""
    if a.layout == "channels":
        return a.t
    if a.layout == "shared":
        return a.t.repeat(1, p, *([1] * (a.t.dim() - 2)))
    pp, n, c = a.t.shape[:3]
    return a.t.transpose(0, 1).reshape(n, pp * c, *a.t.shape[3:])


def _fast_max_pool(m: nn.Module, t: Tensor) -> Tensor | None:
    """A 2x2, stride-2 max pool as the maximum of four strided slices (exact; several times faster
    than max_pool2d on small NCHW maps); None when the pool is not that one."""
    if not isinstance(m, nn.MaxPool2d) or t.dim() != 4 or m.return_indices or m.ceil_mode:
        return None
    k, s, pad, dil = (nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding,
                                                            m.dilation))
    if k != (2, 2) or s != (2, 2) or pad != (0, 0) or dil != (1, 1) or t.shape[-1] % 2 or t.shape[-2] % 2:
        return None
    return torch.maximum(torch.maximum(t[..., 0::2, 0::2], t[..., 0::2, 1::2]),
                         torch.maximum(t[..., 1::2, 0::2], t[..., 1::2, 1::2]))


def _same_in_every_member(views: dict[str, Tensor], names: list[str]) -> bool:
    """True when every member has exactly the same values in these parameters (bitwise; NaN counts as
    different, so such a layer takes the per-member path). O(P * size): negligible next to the forward."""
    for n in names:
        v = views[n]
        if v.shape[0] > 1 and not torch.equal(v[1], v[0]):  # the usual answer, at 1/P of the full comparison
            return False
        if not bool((v == v[:1]).all()):
            return False
    return True


class PopulationForward:
    """`forward(thetas [P, d], x) -> outputs [P, N, ...]` for an nn.Sequential whose trainable
    parameters are `space`; `losses(thetas, x, y, loss_fn) -> [P]`.

    Parameters outside `space` (frozen) and buffers are the module's own. Norm layers in
    training mode normalise with each member's batch statistics and update nothing (as
    `ModelLossOracle` does); in eval mode they use the running statistics.
    """

    def __init__(self, module: nn.Module, space: ParamSpace):
        if not isinstance(module, nn.Sequential):
            raise NotBatchableError(f"population forward needs an nn.Sequential, got {type(module).__name__}")
        self.module, self.space = module, space
        self.layers: list[tuple[str, nn.Module]] = []
        self._seen: set[int] = set()
        self._flatten(module, "")
        owned = {f"{prefix}{n}" for prefix, m in self.layers for n, _ in m.named_parameters(recurse=False)}
        missing = [n for n in space.names if n not in owned]
        if missing:
            raise NotBatchableError(f"parameters {missing} are not owned by a layer the population forward knows")
        self._opaque: set[str] = set()
        self._prefix_cache: tuple | None = None  # (x, key, the prefix's values, its output): see _shared_prefix
        for prefix, m in self.layers:
            self._check(prefix, m)
        first = next((i for i, (prefix, m) in enumerate(self.layers)
                      if any(prefix + n in space.names for n, _ in m.named_parameters(recurse=False))), len(self.layers))
        late = [prefix[:-1] for prefix, _ in self.layers[first:] if prefix in self._opaque]
        if late:
            raise NotBatchableError(f"{late[0]}: {type(dict(self.layers)[late[0] + '.']).__name__} after a perturbed "
                                    "layer is not supported")

    def _flatten(self, seq: nn.Sequential, prefix: str) -> None:
        children = list(seq.named_children())  # each module once, even where the Sequential uses it twice
        if len(children) != len(seq) or any(id(child) in self._seen for _, child in children):
            raise NotBatchableError("a module used twice in the Sequential (shared parameters) is not supported")
        self._seen.update(id(child) for _, child in children)
        for name, child in children:
            if isinstance(child, nn.Sequential):
                self._flatten(child, f"{prefix}{name}.")
            else:
                self.layers.append((f"{prefix}{name}.", child))

    def _check(self, prefix: str, m: nn.Module) -> None:
        kind = type(m)
        if kind in _CONV:
            if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding not in ("valid", "same"):
                raise NotBatchableError(f"{prefix[:-1]}: padding_mode {m.padding_mode!r} is not supported")
        elif kind is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise NotBatchableError(f"{prefix[:-1]}: only Flatten(1, -1) is supported")
        elif isinstance(m, nn.Dropout):
            if m.training and m.p > 0:
                raise NotBatchableError(f"{prefix[:-1]}: dropout in training mode is random")
        elif not (kind is nn.Linear or isinstance(m, _ELEMENTWISE + _POOL + _NORM)):
            if any(True for _ in m.parameters(recurse=True)) or any(True for _ in m.buffers(recurse=True)):
                raise NotBatchableError(f"{prefix[:-1]}: {kind.__name__} is not supported")
            self._opaque.add(prefix)  # parameter-free and unknown: fine while the input is still shared

    # -------------------------------------------------------------------- forward

    def _param(self, views: dict[str, Tensor], m: nn.Module, prefix: str, name: str, p: int) -> Tensor | None:
        """[P, *shape] of a parameter: the member's own when in the space, else the module's, expanded."""
        full = prefix + name
        if full in views:
            return views[full]
        own = getattr(m, name)
        return None if own is None else own.detach().unsqueeze(0).expand(p, *own.shape)

    def forward(self, thetas: Tensor, x: Tensor) -> Tensor:
        p = thetas.shape[0]
        views = self.space.views(thetas)
        shared = 0  # the leading layers every member computes the same (not perturbed in this population)
        for prefix, m in self.layers:
            names = [prefix + n for n, _ in m.named_parameters(recurse=False) if prefix + n in views]
            if names and not _same_in_every_member(views, names):
                break
            shared += 1
        a = _Act(self._shared_prefix(shared, x, views), "shared")  # may be x or a view of it: never in place
        for prefix, m in self.layers[shared:]:
            a = self._layer(m, prefix, a, views, p)
        return _to_batch(a, p)

    def _shared_prefix(self, count: int, x: Tensor, views: dict[str, Tensor]) -> Tensor:
        """The first `count` layers on x, once for all members. A plan executed in chunks calls the
        population forward several times on one batch with the same prefix: the last result is kept
        and reused when x is the same tensor, unmodified (same object, held here so its memory cannot
        be reused, same version counter), and every value the prefix reads (its parameters, member
        0's where in the space, its buffers, the training flags) is equal to the last call's."""
        if count == 0:
            return x
        state = []
        for prefix, m in self.layers[:count]:
            for n, t in m.named_parameters(recurse=False):
                state.append(views[prefix + n][0] if prefix + n in views else t.detach())
            state.extend(b for _, b in m.named_buffers(recurse=False) if b is not None)
        if x.is_inference():  # no version counter to tell an in-place change: never kept
            t = x
            for prefix, m in self.layers[:count]:
                t = self._shared_layer(m, prefix, t, views)
            return t
        key = (count, x._version, tuple(m.training for _, m in self.layers[:count]))
        cached = self._prefix_cache
        if (cached is not None and cached[0] is x and cached[1] == key and len(cached[2]) == len(state)
                and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached[2], state))):
            return cached[3]
        t = x
        for prefix, m in self.layers[:count]:
            t = self._shared_layer(m, prefix, t, views)
        self._prefix_cache = (x, key, [v.clone() for v in state], t)
        return t

    def layer_input(self, theta: Tensor, x: Tensor, name: str) -> Tensor:
        """The input of layer `name` (a module name, e.g. "6") at parameters theta [d] on x: the plain forward
        of the layers before it, through the same prefix cache as `forward`, so a population that perturbs
        only that layer and later ones (subspace CGE) reuses this prefix instead of computing it again.
        KeyError when no layer has that name. The result may be x itself or the cached tensor: read only."""
        prefixes = [prefix for prefix, _ in self.layers]
        if f"{name}." not in prefixes:
            raise KeyError(f"no layer {name!r} in the population forward (layers: "
                           f"{', '.join(p[:-1] for p in prefixes)})")
        return self._shared_prefix(prefixes.index(f"{name}."), x, self.space.views(theta.unsqueeze(0)))

    def _shared_layer(self, m: nn.Module, prefix: str, t: Tensor, views: dict[str, Tensor]) -> Tensor:
        """The plain forward of one layer on the shared input, with member 0's parameters where the
        layer's parameters are in the space (they are the same in every member)."""
        own = {n: views[prefix + n][0] for n, _ in m.named_parameters(recurse=False) if prefix + n in views}
        if isinstance(m, _NORM):
            return self._shared_norm(m, t, own)
        if not own:
            out = _fast_max_pool(m, t)
            return m(t) if out is None else out
        return torch.func.functional_call(m, own, (t,), strict=False)

    def _layer(self, m: nn.Module, prefix: str, a: _Act, views: dict[str, Tensor], p: int) -> _Act:
        kind = type(m)
        if kind in _CONV:
            w = self._param(views, m, prefix, "weight", p)
            b = self._param(views, m, prefix, "bias", p)
            cout = w.shape[1]
            w = w.reshape(p * cout, *w.shape[2:])
            b = None if b is None else b.reshape(p * cout)
            conv = _CONV[kind]
            if a.layout == "shared" and m.groups == 1:
                t = a.t
                groups = 1
            else:
                t, groups = _to_channels(a, p), p * m.groups
            if t.dim() == 4:  # the output follows the input's layout: channels-last all the way down
                t = t.contiguous(memory_format=torch.channels_last)
            return _Act(conv(t, w, b, m.stride, m.padding, m.dilation, groups), "channels", owned=True)
        if kind is nn.Linear:
            w = self._param(views, m, prefix, "weight", p)  # [P, out, in]
            b = self._param(views, m, prefix, "bias", p)
            if a.layout == "shared":  # one matrix product [M, F] x [F, P * out] for all members
                t = a.t
                flat = t.reshape(-1, t.shape[-1])
                out = torch.mm(flat, w.reshape(-1, w.shape[2]).T) if b is None else \
                    torch.addmm(b.reshape(-1), flat, w.reshape(-1, w.shape[2]).T)
                out = out.view(flat.shape[0], p, w.shape[1]).transpose(0, 1)  # [P, M, out]
                return _Act(out.reshape(p, *t.shape[:-1], w.shape[1]), "batch", owned=True)
            t = _to_batch(a, p)
            flat = t.reshape(p, -1, t.shape[-1])
            if b is None:
                out = torch.bmm(flat, w.transpose(1, 2))
            else:
                out = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
            return _Act(out.reshape(*t.shape[:-1], w.shape[1]), "batch", owned=True)
        if kind is nn.Flatten:
            if a.layout == "channels":
                n = a.t.shape[0]
                return _Act(a.t.reshape(n, p, -1).transpose(0, 1), "batch", owned=a.owned)
            return _Act(a.t.flatten(2), "batch", owned=a.owned)
        if isinstance(m, _NORM):
            return self._norm(m, prefix, a, views, p)
        if isinstance(m, _POOL):
            t = _to_channels(a, p) if a.layout == "batch" else a.t
            out = _fast_max_pool(m, t)
            return _Act(m(t) if out is None else out, a.layout if a.layout != "batch" else "channels", owned=True)
        if kind is nn.ReLU and a.owned:  # nobody else holds this tensor: no new buffer of P activations
            return _Act(torch.relu_(a.t), a.layout, owned=True)
        return _Act(m(a.t), a.layout, owned=a.owned and isinstance(m, (nn.Dropout, nn.Identity)))

    def _norm(self, m: nn.Module, prefix: str, a: _Act, views: dict[str, Tensor], p: int) -> _Act:
        t = _to_channels(a, p)
        c = m.num_features
        w = self._param(views, m, prefix, "weight", p)
        b = self._param(views, m, prefix, "bias", p)
        batch_stats = m.training or m.running_mean is None
        rm = None if batch_stats else m.running_mean.repeat(p)
        rv = None if batch_stats else m.running_var.repeat(p)
        out = F.batch_norm(t, rm, rv, None if w is None else w.reshape(p * c), None if b is None else b.reshape(p * c),
                           batch_stats, 0.0, m.eps)
        return _Act(out, "channels", owned=True)

    @staticmethod
    def _shared_norm(m: nn.Module, t: Tensor, own: dict[str, Tensor] | None = None) -> Tensor:
        """A norm layer on the shared input: batch statistics in training mode, never updated; the affine
        parameters from `own` (the members' common values) where given, else the module's."""
        own = own or {}
        batch_stats = m.training or m.running_mean is None
        w = own.get("weight", None if m.weight is None else m.weight.detach())
        b = own.get("bias", None if m.bias is None else m.bias.detach())
        return F.batch_norm(t, None if batch_stats else m.running_mean, None if batch_stats else m.running_var,
                            w, b, batch_stats, 0.0, m.eps)

    def losses(self, thetas: Tensor, x: Tensor, y: Any, loss_fn: Callable[[Tensor, Any], Tensor]) -> Tensor:
        """[P]: loss_fn(member's output, y) for each member."""
        out = self.forward(thetas, x)
        p, n = out.shape[:2]
        if loss_fn is F.cross_entropy and out.dim() == 3 and isinstance(y, Tensor) and y.dim() == 1:
            # the common case without vmap's decomposition (several times faster); mean over the batch as
            # cross_entropy's default reduction
            return F.cross_entropy(out.reshape(p * n, -1), y.repeat(p), reduction="none").view(p, n).mean(1)
        return torch.vmap(lambda o: loss_fn(o, y))(out)
