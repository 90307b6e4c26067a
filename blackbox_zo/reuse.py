"""Exact feature reuse for coordinate-wise estimates on staged torch models (DeepZero Sec. 5).

DeepZero eq. (4) writes the model as a composition f = f_{>l} o f_{1:l}: perturbing a
weight of layer l+1 leaves z_l = f_{1:l}(x) untouched, so the perturbed loss needs only
the layers after l. This module takes that idea to the level of single operations and
adds the linearity that makes each perturbed evaluation far cheaper than a forward pass:

* Once per step (per theta and batch) the unperturbed forward runs through a traced
  graph of the model (torch.fx) and caches the value of every node: every stage's input
  and output. Each parameter block belongs to exactly one node (its stage).
* The coordinates of one node are evaluated together: many perturbations stacked along
  a leading dimension P, only the nodes downstream of that node, in chunks whose size is
  bounded by a memory cap (measured on the first chunk, then adapted).
* Linearity where it is exact. Perturbing weight W[o, i, a, b] of a convolution by mu
  adds mu * (input channel i shifted by (a, b)) to output channel o and to nothing else;
  a linear layer's W[o, i] adds mu * x_i to output feature o; a bias adds mu to one
  channel; a batch-norm gamma_c adds mu * xhat_c to channel c. Such a "one-channel"
  perturbation stays confined to that channel through every per-channel operation
  (ReLU and other elementwise activations, pooling, batch norm in eval mode, and batch
  norm in training mode, whose batch statistics of channel c depend on channel c only:
  they are recomputed per perturbation from the perturbed channel), through flatten,
  and through a residual add with an unperturbed branch. At the next layer that mixes
  channels the output is base + (that layer without bias applied to the one-channel
  delta): a convolution with a single input channel, or a [K x out] slice of a linear
  layer, instead of the whole layer. From there on the perturbation is dense and the
  remaining layers run on P * N samples, batch norm in training mode using the
  statistics of each perturbation's own batch (as the reference path does).
* Everything else in the graph (a function or module type we do not know, a module
  that cannot be traced, which becomes one opaque stage) is evaluated exactly by
  torch.func.vmap over the P perturbations. Parameters used at more than one node fall
  back to the caller's reference path.

Norm layers in training mode: `prepare(..., update_running_stats=True)` (the oracle's
`on_step`) updates running statistics exactly once per step with the unperturbed
parameters; perturbed evaluations never touch them.

`granularity="stage"` disables the linearity and treats every child of the (nested)
nn.Sequential as one opaque stage: DeepZero's own block-level reuse, kept as a
reference point for the benchmark.

Results agree with the plain chunked path (`Oracle.coordinate_losses`) to float
rounding; tests check 1e-5 relative in float32 on the digits CNN and on ResNet-20.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .oracle import ParamSpace

__all__ = ["FeatureReuse", "NotStageableError"]

Granularity = Literal["layer", "stage"]


class NotStageableError(ValueError):
    """The module cannot be traced into stages (torch.fx failed on the root module)."""


# ------------------------------------------------------------------ what we know exactly

_BN_TYPES = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d}
_NORM_BASE = nn.modules.batchnorm._BatchNorm
_ELEMENTWISE_MODULES = {nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.Hardtanh, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid}
_ELEMENTWISE_FUNCS = {F.relu, torch.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.leaky_relu, F.elu,
                      F.relu6, F.hardtanh, F.softplus, F.mish}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}
_POOL_MODULES = {nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d}
_POOL_FUNCS = {F.avg_pool1d, F.avg_pool2d, F.max_pool1d, F.max_pool2d, F.adaptive_avg_pool1d,
               F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch._C._nn.avg_pool2d}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                  operator.itruediv: operator.truediv}


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, Tensor) else 0


# --------------------------------------------------------------- perturbed representations


@dataclass
class _Dense:
    """P perturbed copies of a node's value, stacked next to the batch dimension.

    Activations use pdim=1: x[:, p] is the node's value [N, ...] under perturbation p, so
    `x.view(N * P, ...)` is an ordinary batch of N * P samples for per-sample layers, and
    `x.view(N, P * C, ...)` lets batch norm in training mode take each perturbation's own
    batch statistics with the native kernel. Perturbed parameter tensors use pdim=0.
    """

    x: Tensor
    pdim: int = 1
    owned: bool = False  # a fresh tensor of ours (not a view of another value): may be overwritten

    def nbytes(self) -> int:
        return _tensor_bytes(self.x)


@dataclass
class _Channel:
    """The node's value equals the cached base value except in one channel per perturbation.

    `base` has the node's real shape; its canonical view is [N, C, K] (K = prod(spatial)).
    `flat` marks a flattened tensor [N, C*K] whose channel c occupies features c*K..(c+1)*K.
    `values[:, p]` holds the full perturbed values of channel `channel[p]`: [N, P, K].
    """

    base: Tensor
    nch: int
    spatial: tuple[int, ...]
    flat: bool
    channel: Tensor  # [P] long
    values: Tensor  # [N, P, K]

    @classmethod
    def of(cls, base: Tensor, channel: Tensor, values: Tensor) -> "_Channel":
        return cls(base, base.shape[1], tuple(base.shape[2:]), False, channel,
                   values.reshape(base.shape[0], channel.numel(), -1))

    def replace(self, base: Tensor, values: Tensor, spatial: tuple[int, ...] | None = None) -> "_Channel":
        return _Channel(base, self.nch, self.spatial if spatial is None else spatial, self.flat, self.channel,
                        values.reshape(base.shape[0], self.channel.numel(), -1))

    def canon(self, t: Tensor | None = None) -> Tensor:
        t = self.base if t is None else t
        return t.reshape(t.shape[0], self.nch, -1)

    def base_channel(self, t: Tensor | None = None) -> Tensor:
        """[N, P, K]: the unperturbed values of each perturbation's channel (of `t`, default base)."""
        return self.canon(t).index_select(1, self.channel)

    def delta(self) -> Tensor:
        return self.values - self.base_channel()

    def dense(self) -> _Dense:
        n, p = self.values.shape[:2]
        out = self.canon().unsqueeze(1).repeat(1, p, 1, 1)  # [N, P, C, K]
        out[:, torch.arange(p, device=out.device), self.channel] = self.values
        return _Dense(out.view(n, p, *self.base.shape[1:]), owned=True)

    def nbytes(self) -> int:
        return _tensor_bytes(self.values)


def _is_perturbed(v: Any) -> bool:
    return isinstance(v, (_Dense, _Channel))


def _as_dense(v: Any) -> Any:
    return v.dense() if isinstance(v, _Channel) else v


# --------------------------------------------------------------------------- the tracer


class _StageTracer(fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn's own layers plus the modules in `opaque`
    (or, for granularity 'stage', every module that is not an nn.Sequential)."""

    def __init__(self, opaque: set[str], stage_level: bool):
        super().__init__()
        self.opaque, self.stage_level = opaque, stage_level

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.stage_level:
            return not isinstance(m, nn.Sequential)
        return qualname in self.opaque or super().is_leaf_module(m, qualname)


def _untraceable_modules(root: nn.Module) -> set[str]:
    """Custom submodules that torch.fx cannot trace: each becomes one opaque stage."""
    opaque: set[str] = set()
    base = fx.Tracer()
    for name, sub in root.named_modules():
        if not name or any(name == o or name.startswith(o + ".") for o in opaque):
            continue
        if isinstance(sub, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or base.is_leaf_module(sub, name):
            continue
        try:
            _StageTracer(set(), False).trace(sub)
        except Exception:  # data-dependent control flow and the like: keep it whole
            opaque.add(name)
    return opaque


# ------------------------------------------------------------------------- node handlers


@dataclass
class _Entry:
    """Where a parameter block enters the graph and how its perturbation is built."""

    node: fx.Node
    kind: str  # conv_weight, conv_bias, linear_weight, linear_bias, bn_weight, bn_bias, generic
    local_name: str  # the parameter's name inside the node's module (or the get_attr target)


@dataclass
class _BaseState:
    """The unperturbed forward of one (theta, batch): every node's value, and its loss."""

    theta: Tensor
    x: Any
    y: Any
    versions: tuple
    key: tuple
    params: dict[str, Tensor]
    values: dict[fx.Node, Any]
    output: Tensor
    loss: Tensor
    extra: dict[Any, Any] = field(default_factory=dict)  # lazily computed per-node helpers


class FeatureReuse:
    """Coordinate losses of loss_fn(module(x; theta), y) by exact feature reuse.

    module: traced with torch.fx (an nn.Sequential of stages, or any traceable module);
    space: the flat parameter vector (block names = module parameter names);
    fallback(theta, coords, mu, batch): the reference path, for parameters that are not
    used at exactly one node of the graph.
    """

    def __init__(
        self,
        module: nn.Module,
        space: ParamSpace,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        granularity: Granularity = "layer",
        memory_cap_bytes: int = 256 * 2**20,
        cpu_chunk_bytes: int | None = 32 * 2**20,
        max_chunk: int = 4096,
        fallback: Callable[[Tensor, Tensor, float, Any], Tensor] | None = None,
    ):
        if granularity not in ("layer", "stage"):
            raise ValueError(f"granularity must be 'layer' or 'stage', got {granularity!r}")
        if memory_cap_bytes < 1:
            raise ValueError(f"memory_cap_bytes must be >= 1, got {memory_cap_bytes}")
        self.module, self.space, self.loss_fn = module, space, loss_fn
        self.granularity = granularity
        self.memory_cap_bytes, self.max_chunk = int(memory_cap_bytes), int(max_chunk)
        # On CPU, smaller chunks whose tensors stay in the last-level cache run faster: ResNet-20, batch
        # 64, one thread, load ~3: 5.2x the naive loop with 16-64 MiB chunks, 4.4x with 256 MiB. On a
        # GPU only the memory cap applies (bigger chunks, fewer kernel launches).
        self.cpu_chunk_bytes = cpu_chunk_bytes
        self._donated: set[int] = set()
        self.fallback = fallback
        self._space_names = set(space.names)
        opaque = set() if granularity == "stage" else _untraceable_modules(module)
        try:
            self.graph = _StageTracer(opaque, granularity == "stage").trace(module)
        except Exception as exc:
            raise NotStageableError(f"cannot trace {type(module).__name__} into stages: {type(exc).__name__}: {exc}") from exc
        self.opaque = opaque
        if granularity == "layer" and _COMMUTE_RELU_POOL:
            _pool_before_relu(self.graph, dict(module.named_modules()))
        self.nodes = [n for n in self.graph.nodes]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(module.named_modules())
        outputs = [n for n in self.nodes if n.op == "output"]
        self.output_node = outputs[0].args[0]
        if not isinstance(self.output_node, fx.Node):
            raise NotStageableError("the traced module must return one tensor")
        self.entries: list[_Entry | None] = [self._find_entry(b.name) for b in space]
        self._downstream: dict[fx.Node, list[fx.Node]] = {}
        self._last_use: dict[fx.Node, dict[fx.Node, int]] = {}
        self._bytes_per_p: dict[int, float] = {}  # measured peak perturbed-state bytes per perturbation, by block
        self._state: _BaseState | None = None
        self._direct: dict[str, str] = {}  # how the base forward calls each module (_direct_kind)
        self._key_modules: list[nn.Module] | None = None  # what _cache_key reads (built on first use)
        self._key_frozen: list[tuple[nn.Module, str]] = []
        self._key_frozen_quals: list[str] = []
        self._groups: tuple | None = None  # the last coordinate set: (coords, blocks, groups by block, units)
        self.stats = {"base_passes": 0, "cache_hits": 0, "fallback_coords": 0}
        # Set to a dict to collect CPU seconds per (block, operation) of `coordinate_losses`
        # (benchmarks/profile_reuse.py); None: no timing at all.
        self.timings: dict[tuple[str, str], float] | None = None

    # -- structure ------------------------------------------------------------------

    def _find_entry(self, pname: str) -> _Entry | None:
        users = []
        for n in self.nodes:
            if n.op == "call_module" and pname.startswith(n.target + "."):
                users.append(n)
            elif n.op == "get_attr" and n.target == pname:
                users.append(n)
        if len(users) != 1:  # unused, or shared by several calls: the reference path handles it
            return None
        node = users[0]
        if node.op == "get_attr":
            return _Entry(node, "generic", pname)
        local = pname[len(node.target) + 1:]
        kind = self._module_kind(node)
        if kind in ("conv", "linear", "bn") and local in ("weight", "bias"):
            if kind == "linear" and local == "weight":
                return _Entry(node, "linear_weight", local)  # needs a 2-D input; checked per call
            return _Entry(node, f"{kind}_{local}", local)
        return _Entry(node, "generic", local)

    def _module_kind(self, node: fx.Node) -> str:
        if self.granularity == "stage" or node.op != "call_module":
            return "generic"
        m = self.modules[node.target]
        t = type(m)
        if t is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return "conv"
        if t is nn.Linear:
            return "linear"
        if t in _BN_TYPES:
            return "bn"
        if t in _ELEMENTWISE_MODULES:
            return "elementwise"
        if t in _POOL_MODULES and not getattr(m, "return_indices", False):
            return "pool"
        if t is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        if t is nn.Identity or (t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d) and (not m.training or m.p == 0)):
            return "pass"
        return "generic"

    def _node_kind(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return self._module_kind(node)
        if self.granularity == "stage":
            return "generic"
        if node.op == "call_function":
            if node.target in _ELEMENTWISE_FUNCS:
                return "elementwise"
            if node.target in _POOL_FUNCS:
                return "pool"
            if node.target in _ADD_FUNCS and len(node.args) == 2 and not node.kwargs:
                return "add"
            if node.target is torch.flatten and node.args[1:] == (1,) and not node.kwargs:
                return "flatten"
        if node.op == "call_method":
            if node.target in _ELEMENTWISE_METHODS and len(node.args) == 1 and not node.kwargs:
                return "elementwise"
            if node.target == "flatten" and node.args[1:] == (1,) and not node.kwargs:
                return "flatten"
        return "generic"

    def downstream(self, node: fx.Node) -> list[fx.Node]:
        """Nodes whose value depends on `node`, in execution order (the stages to re-run)."""
        if node not in self._downstream:
            reach = {node}
            out = []
            for n in self.nodes[self.order[node] + 1:]:
                if n.op == "output":
                    continue
                if any(a in reach for a in n.all_input_nodes):
                    reach.add(n)
                    out.append(n)
            last: dict[fx.Node, int] = {}
            for i, n in enumerate(out):
                for a in n.all_input_nodes:
                    if a in reach:
                        last[a] = i
            self._downstream[node], self._last_use[node] = out, last
        return self._downstream[node]

    # -- parameters and buffers -----------------------------------------------------

    def _params(self, theta: Tensor) -> dict[str, Tensor]:
        if self._key_modules is None:
            self._cache_key()  # builds the list of parameters theta does not hold
        named = {f"{qual}.{name}" if qual else name: m._parameters[name].detach()
                 for (m, name), qual in zip(self._key_frozen, self._key_frozen_quals)}
        named.update(self.space.views(theta))
        return named

    def _module_tensors(self, qual: str, params: dict[str, Tensor], update_stats: bool) -> dict[str, Any]:
        """Parameters (from theta) and buffers of submodule `qual`, for functional_call.

        Norm layers in training mode get None for their running statistics (batch
        statistics, nothing updated) unless `update_stats`, where the real buffers are
        passed and updated in place, exactly as the module's own forward would.
        """
        m = self.modules[qual]
        prefix = f"{qual}." if qual else ""
        out: dict[str, Any] = {n: params[prefix + n] for n, _ in m.named_parameters()}
        for sname, sub in m.named_modules():
            sp = f"{sname}." if sname else ""
            frozen = isinstance(sub, _NORM_BASE) and sub.training and not update_stats
            for bname, buf in sub.named_buffers(recurse=False):
                out[sp + bname] = None if frozen else buf
        return out

    # -- the unperturbed forward, cached per step -------------------------------------

    def _cache_key(self) -> tuple:
        """Module modes, the versions of the buffers that enter the loss and of the parameters theta
        does not hold: what invalidates the cached forward besides theta and the batch. Read from the
        modules' own dicts (the module tree is fixed once traced; a buffer or parameter may be
        replaced, which these reads see), called several times per step."""
        if self._key_modules is None:
            self._key_modules = list(self.modules.values())
            frozen = [n for n, _ in self.module.named_parameters() if n not in self._space_names]
            self._key_frozen = [(self.modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in frozen]
            self._key_frozen_quals = [n.rpartition(".")[0] for n in frozen]
        mods = self._key_modules
        flags = tuple(m.training for m in mods)
        bufs = []
        for m in mods:
            if isinstance(m, _NORM_BASE) and m.training:
                continue  # batch statistics: the running buffers do not enter the loss
            bufs.extend(b._version for b in m._buffers.values() if b is not None)
        frozen = tuple(m._parameters[name]._version for m, name in self._key_frozen)
        return flags, tuple(bufs), frozen

    @staticmethod
    def _batch_versions(x: Any, y: Any) -> tuple:
        return tuple(t._version for t in (x, y) if isinstance(t, Tensor))

    @torch.no_grad()
    def prepare(self, theta: Tensor, batch: Any, *, update_running_stats: bool = False) -> _BaseState:
        """The cached unperturbed forward for (theta, batch); recomputed when either changed
        (theta by value; the batch by identity and version; module modes and buffers by version)."""
        x, y = batch
        st = self._state
        key = self._cache_key()
        if (not update_running_stats and st is not None and st.x is x and st.y is y
                and st.versions == self._batch_versions(x, y) and st.key == key
                and st.theta.shape == theta.shape and st.theta.device == theta.device and torch.equal(st.theta, theta)):
            self.stats["cache_hits"] += 1
            return st
        self._state = None  # free the previous step's features before computing new ones
        params = self._params(theta)
        values: dict[fx.Node, Any] = {}
        for n in self.nodes:
            if n.op == "placeholder":
                values[n] = x
            elif n.op == "get_attr":
                values[n] = params[n.target] if n.target in params else _get_attr(self.module, n.target)
            elif n.op == "output":
                continue
            else:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
                values[n] = self._call_base(n, args, kwargs, params, update_running_stats)
        output = values[self.output_node]
        loss = self.loss_fn(output, y)
        self.stats["base_passes"] += 1
        # the forward changes no version unless it updated running statistics: the key read above holds
        self._state = _BaseState(theta.detach().clone(), x, y, self._batch_versions(x, y),
                                 self._cache_key() if update_running_stats else key, params, values, output, loss)
        return self._state

    def _call_base(self, n: fx.Node, args: tuple, kwargs: dict, params: dict[str, Tensor], update: bool) -> Any:
        if n.op == "call_module":
            m = self.modules[n.target]
            if getattr(m, "inplace", False):  # never overwrite a cached value
                args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            direct = self._direct.get(n.target)
            if direct is None:
                direct = self._direct[n.target] = _direct_kind(m)
            # the module's own forward with theta's tensors, without functional_call's swapping of
            # parameters in and out (a third of a digits base forward); the same kernels, the same values
            if direct == "conv" and len(args) == 1 and not kwargs:
                return m._conv_forward(args[0], params[n.target + ".weight"],
                                       params[n.target + ".bias"] if m.bias is not None else None)
            if direct == "linear" and len(args) == 1 and not kwargs:
                return F.linear(args[0], params[n.target + ".weight"],
                                params[n.target + ".bias"] if m.bias is not None else None)
            if direct == "maxpool" and len(args) == 1 and not kwargs:
                # maxima of strided slices: the same values as the pooling kernel (max is exact), 10x
                # faster on small planes (digits: 0.34 -> 0.03 ms of a 1.1 ms base forward)
                return _max_pool2d_by_slices(args[0], _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation))
            if direct == "stateless":
                return m(*args, **kwargs)
            return functional_call(m, self._module_tensors(n.target, params, update), args, kwargs)
        fn = _out_of_place(n)
        if "inplace" in kwargs:
            kwargs = {**kwargs, "inplace": False}
        return fn(*args, **kwargs)

    @torch.no_grad()
    def base_loss(self, theta: Tensor, batch: Any) -> Tensor:
        return self.prepare(theta, batch).loss

    # -- coordinate losses ------------------------------------------------------------

    @torch.no_grad()
    def coordinate_losses(self, theta: Tensor, coords: Tensor, mu: float, batch: Any) -> Tensor:
        """Losses at theta + mu e_j for each j in coords ([K] -> [K]), DeepZero eq. (1)/(4).

        Blocks that enter the graph at the same node as one-channel perturbations (a layer's weight
        and bias) are evaluated together, one downstream pass for both; the losses of all chunks are
        computed in one call at the end (at most `cpu_chunk_bytes` / the memory cap of outputs held).
        Each perturbation's arithmetic is the same as alone (tests/test_reuse.py checks the bits)."""
        coords = coords.to(device=theta.device, dtype=torch.long).reshape(-1).contiguous()
        out = theta.new_empty(coords.numel())
        if coords.numel() == 0:
            return out
        tm = self.timings
        if tm is not None:
            t_start = time.process_time()
        st = self.prepare(theta, batch)
        if tm is not None:
            _tick(tm, ("(all blocks)", "base forward or cache check"), t_start, time.process_time)
        blocks, groups, units = self._grouped(coords)
        losses = _PendingLosses(self, st, out)
        for unit in units:
            for parts in self._unit_chunks(unit):
                self._evaluate(st, parts, float(mu), losses)
        losses.flush()
        fallback_pos = [pos for bi, pos, _ in groups if self.entries[bi] is None]
        if fallback_pos:
            pos = torch.cat(fallback_pos)
            if self.fallback is None:
                names = sorted({self.space.blocks[int(b)].name for b in blocks[pos].unique().tolist()})
                raise ValueError(f"parameters {names} are not used at exactly one stage and no fallback was given")
            self.stats["fallback_coords"] += pos.numel()
            out[pos] = self.fallback(theta, coords[pos], mu, batch)
        if tm is not None:
            _tick(tm, ("(all blocks)", "coordinate_losses total"), t_start, time.process_time)
        return out

    def _grouped(self, coords: Tensor) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]], list[list[int]]]:
        """The coordinates by block: (block, positions in coords, local indices sorted, so that the
        perturbations of one output channel are adjacent), and the units evaluated together (lists of
        indices into the groups: the blocks whose perturbations enter at one node as one-channel
        values). Kept for the next call with the same set (Sparse-CGE uses one set for a whole epoch)."""
        cached = self._groups
        if (cached is not None and cached[0].shape == coords.shape and cached[0].device == coords.device
                and torch.equal(cached[0], coords)):
            return cached[1], cached[2], cached[3]
        blocks = self.space.block_index(coords.cpu()).to(coords.device)
        groups = []
        if coords.numel() > 1 and bool((coords[1:] > coords[:-1]).all()):
            # sorted and distinct (a rank's contiguous piece of a sorted set: it changes whenever the
            # cut moves, i.e. every step of a refined 2-rank run): each block is one run of positions,
            # already in order; the same groups as below, 10x cheaper
            ids, counts = torch.unique_consecutive(blocks, return_counts=True)
            start = 0
            for bi, n in zip(ids.tolist(), counts.tolist()):
                groups.append((bi, torch.arange(start, start + n, device=coords.device),
                               coords[start:start + n] - self.space.blocks[bi].offset))
                start += n
        else:
            for bi in torch.unique(blocks).tolist():
                pos = torch.nonzero(blocks == bi).squeeze(1)
                local, order = torch.sort(coords[pos] - self.space.blocks[bi].offset)
                groups.append((bi, pos[order], local))
        units: list[list[int]] = []
        by_node: dict[fx.Node, list[int]] = {}
        for gi, (bi, _, _) in enumerate(groups):
            entry = self.entries[bi]
            if entry is None:
                continue
            if entry.kind in _ONE_CHANNEL_ENTRIES:
                if entry.node not in by_node:
                    by_node[entry.node] = []
                    units.append(by_node[entry.node])
                by_node[entry.node].append(gi)
            else:
                units.append([gi])
        self._groups = (coords.clone(), blocks, groups, [[groups[gi] for gi in u] for u in units])
        return self._groups[1], self._groups[2], self._groups[3]

    def _unit_chunks(self, unit: list[tuple[int, Tensor, Tensor]]):
        """Chunks of a unit's perturbations, each a list of (block, positions, local indices) parts;
        the chunk size is the smallest of its blocks' (`_chunk_size`)."""
        chunk = min(self._chunk_size(bi, self.entries[bi]) for bi, _, _ in unit)
        parts: list[tuple[int, Tensor, Tensor]] = []
        room = chunk
        for bi, pos, local in unit:
            start = 0
            while start < pos.numel():
                take = min(room, pos.numel() - start)
                parts.append((bi, pos[start:start + take], local[start:start + take]))
                start += take
                room -= take
                if room == 0:
                    yield parts
                    parts, room = [], chunk
        if parts:
            yield parts

    def _chunk_size(self, bi: int, entry: _Entry) -> int:
        per_p = self._bytes_per_p.get(bi)
        if per_p is None:  # first chunk: a safe bound from the sizes of the nodes it may touch
            st = self._state
            biggest = max([_tensor_bytes(st.values[n]) for n in self.downstream(entry.node)]
                          + [_tensor_bytes(st.values[entry.node]), _tensor_bytes(st.output)])
            per_p = 4.0 * biggest
        return int(max(1, min(self.max_chunk, self._cap_bytes() // max(1.0, per_p))))

    def _cap_bytes(self) -> int:
        cap = self.memory_cap_bytes
        if self.cpu_chunk_bytes and self._state is not None and self._state.theta.device.type == "cpu":
            cap = min(cap, self.cpu_chunk_bytes)
        return cap

    def _evaluate(self, st: _BaseState, parts: list[tuple[int, Tensor, Tensor]], mu: float,
                  losses: "_PendingLosses") -> None:
        """The perturbations of `parts` (blocks entering at one node), all at once, down to the output;
        their outputs go to `losses`."""
        entry = self.entries[parts[0][0]]
        node = entry.node
        tm = self.timings
        if tm is not None:
            block_name = "+".join(dict.fromkeys(self.space.blocks[bi].name for bi, _, _ in parts))
            clock = time.process_time
            t0 = clock()
        reps = [self._entry_value(st, bi, self.entries[bi], local, mu) for bi, _, local in parts]
        pos = parts[0][1]
        if len(reps) > 1:
            if all(isinstance(r, _Channel) and not r.flat for r in reps):
                rep, pos = _merge_channels(reps, [p for _, p, _ in parts])
            else:  # representations that do not merge (e.g. a linear weight on a non-2-D input): one by one
                for part in parts:
                    self._evaluate(st, [part], mu, losses)
                return
        else:
            rep = reps[0]
        if tm is not None:
            t0 = _tick(tm, (block_name, f"entry {entry.kind}"), t0, clock)
        values: dict[fx.Node, Any] = {node: rep}
        live = peak = rep.nbytes()
        downstream = self.downstream(node)
        last = self._last_use[node]
        for i, n in enumerate(downstream):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values.get(a, st.values[a]))
            self._donated = self._donatable(values, [a for a in n.all_input_nodes if last.get(a) == i])
            v = self._call_perturbed(st, n, args, kwargs)
            self._donated = set()
            values[n] = v
            if tm is not None:
                kind = "one-channel" if any(isinstance(a, _Channel) for a in args) else "dense"
                t0 = _tick(tm, (block_name, f"{self._node_kind(n)} ({kind})"), t0, clock)
            live += _rep_bytes(v)
            peak = max(peak, live)
            for a in n.all_input_nodes:
                if last.get(a) == i and a in values:
                    live -= _rep_bytes(values.pop(a))
        p = pos.numel()
        for bi, _, _ in parts:
            self._bytes_per_p[bi] = 2.0 * peak / p  # headroom for temporaries inside the operations
        res = values.get(self.output_node)
        if res is None:  # the perturbation never reaches the output
            losses.out[pos] = st.loss.expand(p)
        else:
            losses.add(_as_dense(res), pos, block_name if tm is not None else None)
        if tm is not None:
            _tick(tm, (block_name, "loss"), t0, clock)

    def _class_targets(self, st: _BaseState, out_dim: int) -> bool:
        """The step's loss is cross-entropy of logits [N, C] with class indices [N], all valid (no
        ignore_index, none out of range: those keep the vmap path and its errors)."""
        key = ("class_targets", out_dim)
        if key not in st.extra:
            y, base = st.y, st.output
            st.extra[key] = (out_dim == 3 and isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point()
                             and not y.is_complex() and base.dim() == 2 and base.shape[0] == y.shape[0]
                             and bool(((y >= 0) & (y < base.shape[1])).all()))
        return st.extra[key]

    @staticmethod
    def _donatable(values: dict[fx.Node, Any], dying: list[fx.Node]) -> set[int]:
        """ids of the dense values used for the last time here that no other live value shares
        memory with: a handler may overwrite them (ReLU, residual add) instead of allocating a
        tensor of P activations (less peak memory, fewer page faults)."""
        out = set()
        for a in dying:
            v = values.get(a)
            if not (isinstance(v, _Dense) and v.owned):
                continue
            ptr = v.x.untyped_storage().data_ptr()
            shared = any(_storage_ptrs(w) & {ptr} for b, w in values.items() if b is not a)
            if not shared:
                out.add(id(v))
        return out

    # -- where a perturbation enters ---------------------------------------------------

    def _entry_value(self, st: _BaseState, bi: int, entry: _Entry, local: Tensor, mu: float) -> Any:
        node, kind = entry.node, entry.kind
        base_out = st.values[node]
        inp = st.values[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
        if kind == "linear_weight" and not (isinstance(inp, Tensor) and inp.dim() == 2):
            kind = "generic"
        if kind == "conv_weight":
            m = self.modules[node.target]
            cout = m.weight.shape[0]
            per_out = m.weight[0].numel()
            o, r = local // per_out, local % per_out
            cols = self._unfolded_input(st, node, m)  # [N, Cin*kh*kw, L]: what each weight multiplies
            # in place on the fresh gather of the output channels: the same kernel (a + alpha * b), one
            # [N, P, L] buffer fewer
            v = base_out.reshape(base_out.shape[0], cout, -1).index_select(1, o)
            v.add_(cols.index_select(1, r), alpha=mu)
            return _Channel.of(base_out, o, v)
        if kind == "linear_weight":
            fan_in = inp.shape[1]
            o, i = local // fan_in, local % fan_in
            v = base_out.index_select(1, o)  # [N, P]
            v.add_(inp.index_select(1, i), alpha=mu)
            return _Channel.of(base_out, o, v)
        if kind in ("conv_bias", "linear_bias", "bn_bias"):
            v = base_out.index_select(1, local) + mu
            return _Channel.of(base_out, local, v)
        if kind == "bn_weight":
            xhat = self._bn_normalized(st, node).index_select(1, local)  # [N, P, K]
            v = torch.add(base_out.reshape(base_out.shape[0], base_out.shape[1], -1).index_select(1, local), xhat,
                          alpha=mu)
            return _Channel.of(base_out, local, v)
        return self._generic_entry(st, bi, entry, local, mu)

    def _unfolded_input(self, st: _BaseState, node: fx.Node, m: nn.Conv2d) -> Tensor:
        """im2col of the conv's cached input, [N, Cin*kh*kw, Ho*Wo]; row r is what weight column r
        multiplies. Only the current node's is kept (they are large for early layers)."""
        key = ("cols", node)
        if key not in st.extra:
            for k in [k for k in st.extra if k[0] == "cols"]:
                del st.extra[k]
            st.extra[key] = _im2col(st.values[node.args[0]], _pair(m.kernel_size), _pair(m.dilation),
                                    _pair(m.padding), _pair(m.stride))
        return st.extra[key]

    def _bn_stats(self, st: _BaseState, node: fx.Node) -> tuple[Tensor, Tensor]:
        """(mean, 1/sqrt(var + eps)) per channel that the norm layer used in the base pass."""
        key = ("bn", node)
        if key not in st.extra:
            m = self.modules[node.target]
            x = st.values[node.args[0]]
            if m.training or m.running_mean is None:
                xc = x.transpose(0, 1).reshape(x.shape[1], -1)
                var, mean = torch.var_mean(xc, dim=1, unbiased=False)
            else:
                mean, var = m.running_mean, m.running_var
            st.extra[key] = (mean, torch.rsqrt(var + m.eps))
        return st.extra[key]

    def _bn_normalized(self, st: _BaseState, node: fx.Node) -> Tensor:
        mean, invstd = self._bn_stats(st, node)
        x = st.values[node.args[0]]
        xc = x.reshape(x.shape[0], x.shape[1], -1)
        return (xc - mean[None, :, None]) * invstd[None, :, None]

    def _generic_entry(self, st: _BaseState, bi: int, entry: _Entry, local: Tensor, mu: float) -> _Dense:
        """Exact for any module: vmap the node over P perturbed copies of the parameter."""
        block = self.space.blocks[bi]
        p = local.numel()
        flat = st.theta[block.slice].unsqueeze(0).repeat(p, 1)
        flat[torch.arange(p, device=flat.device), local] += mu
        perturbed = flat.view(p, *block.shape)
        node = entry.node
        if node.op == "get_attr":
            return _Dense(perturbed, pdim=0)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: st.values[a])
        tensors = self._module_tensors(node.target, st.params, False)
        m = self.modules[node.target]

        def one(w: Tensor) -> Tensor:
            return functional_call(m, {**tensors, entry.local_name: w}, args, kwargs)

        base_out = st.values[node]
        out_dims = tree_map(lambda t: 1 if isinstance(t, Tensor) and t.dim() >= 1 else 0, base_out)
        return tree_map(_Dense, vmap(one, out_dims=out_dims)(perturbed), out_dims)

    # -- downstream of the perturbation ------------------------------------------------

    def _call_perturbed(self, st: _BaseState, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        base_out = st.values[n]
        if not isinstance(base_out, Tensor):
            if isinstance(base_out, (tuple, list)) and any(isinstance(t, Tensor) for t in base_out):
                return self._generic(st, n, args, kwargs)
            return base_out  # shapes, sizes: independent of the parameter values
        kind = self._node_kind(n)
        x = args[0] if args else None
        if kind == "elementwise" and _is_perturbed(x) and not _has_perturbed((args[1:], kwargs)):
            fn = self._elementwise_fn(n, args, kwargs)
            if isinstance(x, _Channel):
                return x.replace(base_out, fn(x.values))
            if id(x) in self._donated and _is_relu(n, self.modules):
                return _Dense(torch.relu_(x.x), x.pdim, owned=True)
            return _Dense(fn(x.x), x.pdim, owned=True)
        if kind == "pool" and _is_perturbed(x) and not _has_perturbed((args[1:], kwargs)):
            fn = self._per_sample_fn(n, args, kwargs)
            if isinstance(x, _Channel) and not x.flat:
                # a pool acts on each (sample, channel) plane alone: the planes [N, P, *S] are such a batch
                nb, p = x.values.shape[:2]
                y = fn(x.values.view(nb, p, *x.spatial))
                return x.replace(base_out, y, spatial=tuple(base_out.shape[2:]))
            x = _as_dense(x)
            if x.pdim == 1:
                nb, p = x.x.shape[:2]
                return _Dense(fn(x.x.reshape(nb * p, *x.x.shape[2:])).view(nb, p, *base_out.shape[1:]), owned=True)
        if kind == "flatten" and _is_perturbed(x):
            if isinstance(x, _Channel) and not x.flat:
                return _Channel(base_out, x.nch, x.spatial, True, x.channel, x.values)
            x = _as_dense(x)
            if x.pdim == 1:
                return _Dense(x.x.reshape(x.x.shape[0], x.x.shape[1], *base_out.shape[1:]))
        if kind == "pass":
            return x
        if kind == "add":
            return self._add(st, n, args, base_out)
        if kind == "conv" and _is_perturbed(x):
            return self._conv(st, n, x, base_out)
        if kind == "linear" and _is_perturbed(x):
            return self._linear(st, n, x, base_out)
        if kind == "bn" and _is_perturbed(x):
            return self._bn(st, n, x, base_out)
        return self._generic(st, n, args, kwargs)

    def _elementwise_fn(self, n: fx.Node, args: tuple, kwargs: dict) -> Callable[[Tensor], Tensor]:
        if n.op == "call_module":
            m = self.modules[n.target]
            return (lambda t: m(t.clone())) if getattr(m, "inplace", False) else m
        if n.op == "call_method":
            return lambda t: getattr(t, n.target)()
        kw = {**kwargs, "inplace": False} if "inplace" in kwargs else kwargs
        return lambda t: n.target(t, *args[1:], **kw)

    def _per_sample_fn(self, n: fx.Node, args: tuple, kwargs: dict) -> Callable[[Tensor], Tensor]:
        if n.op == "call_module":
            m = self.modules[n.target]
            if type(m) is nn.MaxPool2d and _pair(m.padding) == (0, 0) and not m.ceil_mode:
                return lambda t: _max_pool2d_by_slices(t, _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation))
            return m
        return lambda t: n.target(t, *args[1:], **kwargs)

    def _add(self, st: _BaseState, n: fx.Node, args: tuple, base_out: Tensor) -> Any:
        a, b = args
        if isinstance(b, _Channel) and not _is_perturbed(a):
            a, b = b, a
        if (isinstance(a, _Channel) and isinstance(b, Tensor) and b.shape == a.base.shape
                and base_out.shape == a.base.shape):
            # one-channel + unperturbed = one channel: the other branch's channel is added
            return a.replace(base_out, a.values + a.base_channel(b))
        da, db = _as_dense(a), _as_dense(b)
        if all((isinstance(v, _Dense) and v.pdim == 1 and v.x.shape[2:] == base_out.shape[1:]) or
               (isinstance(v, Tensor) and v.shape == base_out.shape) for v in (da, db)):
            if isinstance(db, _Dense) and id(db) in self._donated and not isinstance(da, _Dense):
                da, db = db, da  # addition commutes: overwrite the dense operand that dies here
            xa = da.x if isinstance(da, _Dense) else da.unsqueeze(1)
            xb = db.x if isinstance(db, _Dense) else db.unsqueeze(1)
            if isinstance(da, _Dense) and id(da) in self._donated and xa.shape == torch.broadcast_shapes(xa.shape, xb.shape):
                return _Dense(xa.add_(xb), owned=True)
            return _Dense(xa + xb, owned=True)
        return self._generic(st, n, args, {})  # broadcasting or scalars: let vmap sort it out

    def _conv(self, st: _BaseState, n: fx.Node, x: Any, base_out: Tensor) -> Any:
        m = self.modules[n.target]
        w = st.params[n.target + ".weight"]
        if isinstance(x, _Channel) and not x.flat:
            # conv is linear in its input: base + conv(one-channel delta, W[:, c]) without bias. The
            # perturbations come sorted by channel, so each run of equal channels is one ordinary
            # convolution with a single input channel. When the runs are short (many channels, few
            # perturbations each: biases, sparse coordinate sets) one grouped convolution, a group per
            # perturbation, does it in one call instead (the same values: tests/test_reuse.py; 2.8x
            # faster for 8 perturbations in 8 channels, slower for long runs; docs/performance.md).
            nb, p = x.values.shape[:2]
            delta = x.delta().view(nb, p, *x.spatial)
            chans, counts = torch.unique_consecutive(x.channel, return_counts=True)
            if chans.numel() > 1 and p <= 2 * chans.numel():
                wg = w.index_select(1, x.channel).transpose(0, 1).reshape(p * w.shape[0], 1, *w.shape[2:])
                d = F.conv2d(delta, wg, None, m.stride, m.padding, m.dilation, groups=p)
                return _Dense(torch.add(d.view(nb, p, *base_out.shape[1:]), base_out.unsqueeze(1)), owned=True)
            out = torch.empty((nb, p, *base_out.shape[1:]), dtype=base_out.dtype, device=base_out.device)
            runs = delta.transpose(0, 1).contiguous()  # [P, N, ...]: each run's samples contiguous, one copy
            start = 0
            for c, k in zip(chans.tolist(), counts.tolist()):
                piece = runs[start:start + k].view(k * nb, 1, *x.spatial)
                d = F.conv2d(piece, w[:, c:c + 1], None, m.stride, m.padding, m.dilation)
                torch.add(d.view(k, nb, *base_out.shape[1:]).transpose(0, 1), base_out.unsqueeze(1),
                          out=out[:, start:start + k])
                start += k
            return _Dense(out, owned=True)
        x = _as_dense(x)
        if x.pdim != 1:
            return self._generic(st, n, (x,), {})
        nb, p = x.x.shape[:2]
        b = st.params.get(n.target + ".bias") if m.bias is not None else None
        y = m._conv_forward(x.x.reshape(nb * p, *x.x.shape[2:]), w, b)
        return _Dense(y.view(nb, p, *base_out.shape[1:]), owned=True)

    def _linear(self, st: _BaseState, n: fx.Node, x: Any, base_out: Tensor) -> Any:
        w = st.params[n.target + ".weight"]
        if isinstance(x, _Channel) and (x.flat or x.base.dim() == 2):
            # the features of channel c are columns c*K..(c+1)*K: base + delta @ W[:, block].T
            nb, p, k = x.values.shape
            wk = w.view(w.shape[0], x.nch, k)
            chans, counts = torch.unique_consecutive(x.channel, return_counts=True)
            if nb * p >= _LINEAR_RUN_ROWS * chans.numel():
                # long runs of equal channels (large batch, dense CGE): one matrix product per run on all
                # its rows. The delta is written perturbation-major ([P, N, K]) so that a run is one
                # contiguous [run * N, K] matrix: a single mm (a [N, run, K] slice went through matmul's
                # batched fallback, an mm per sample: 2x slower). The same dot products over K in the
                # same order, so the same bits (tests/test_reuse.py)
                delta = torch.empty((p, nb, k), dtype=x.values.dtype, device=x.values.device)
                torch.sub(x.values.transpose(0, 1), x.base_channel().transpose(0, 1), out=delta)
                d = torch.empty((p, nb, w.shape[0]), dtype=delta.dtype, device=delta.device)
                start = 0
                for c, run in zip(chans.tolist(), counts.tolist()):
                    torch.mm(delta[start:start + run].view(run * nb, k), wk[:, c].t(),
                             out=d[start:start + run].view(run * nb, w.shape[0]))
                    start += run
                out = torch.empty((nb, p, w.shape[0]), dtype=d.dtype, device=d.device)
                return _Dense(torch.add(d.transpose(0, 1), base_out.unsqueeze(1), out=out), owned=True)
            delta = x.delta()
            wc = wk.index_select(1, x.channel).permute(1, 2, 0)  # [P, K, out]
            d = torch.bmm(delta.transpose(0, 1), wc).transpose(0, 1)  # [N, P, out]
            return _Dense(d + base_out.unsqueeze(1), owned=True)
        x = _as_dense(x)
        b = st.params.get(n.target + ".bias") if self.modules[n.target].bias is not None else None
        return _Dense(F.linear(x.x, w, b), x.pdim, owned=True)

    def _bn(self, st: _BaseState, n: fx.Node, x: Any, base_out: Tensor) -> Any:
        """Batch norm of perturbed inputs with F.batch_norm itself, perturbations laid out as channels:
        in training mode each (perturbation, channel) pair gets the statistics of its own batch,
        exactly as the reference path's vmap does; running statistics are never passed, so never updated."""
        m = self.modules[n.target]
        w = st.params.get(n.target + ".weight") if m.affine else None
        b = st.params.get(n.target + ".bias") if m.affine else None
        batch_stats = m.training or m.running_mean is None
        if isinstance(x, _Channel) and not x.flat:
            ch = x.channel
            take = lambda t: None if t is None else t.index_select(0, ch)  # noqa: E731
            rm, rv = (None, None) if batch_stats else (take(m.running_mean), take(m.running_var))
            y = F.batch_norm(x.values, rm, rv, take(w), take(b), batch_stats, 0.0, m.eps)  # [N, P, K]: P "channels"
            return x.replace(base_out, y)
        x = _as_dense(x)
        if x.pdim != 1:
            return self._generic(st, n, (x,), {})
        nb, p = x.x.shape[:2]
        rep = lambda t: None if t is None else t.repeat(p)  # noqa: E731
        rm, rv = (None, None) if batch_stats else (rep(m.running_mean), rep(m.running_var))
        y = F.batch_norm(x.x.reshape(nb, p * base_out.shape[1], *base_out.shape[2:]), rm, rv, rep(w), rep(b),
                         batch_stats, 0.0, m.eps)
        return _Dense(y.view(nb, p, *base_out.shape[1:]), owned=True)

    def _generic(self, st: _BaseState, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Any node: vmap over the perturbations (dims 0 of the perturbed inputs)."""
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [_as_dense(v) for v in leaves]
        batched = [i for i, v in enumerate(leaves) if isinstance(v, _Dense)]
        if not batched:
            return st.values[n]
        if n.op == "call_module":
            m = self.modules[n.target]
            tensors = self._module_tensors(n.target, st.params, False)

            def call(a, k):
                if getattr(m, "inplace", False):
                    a = tuple(t.clone() if isinstance(t, Tensor) else t for t in a)
                return functional_call(m, tensors, a, k)
        else:
            fn = _out_of_place(n)

            def call(a, k):
                if "inplace" in k:
                    k = {**k, "inplace": False}
                return fn(*a, **k)

        def one(*xs: Tensor) -> Any:
            filled = list(leaves)
            for i, t in zip(batched, xs):
                filled[i] = t
            a, k = tree_unflatten(filled, spec)
            return call(a, k)

        base_out = st.values[n]
        out_dims = tree_map(lambda t: 1 if isinstance(t, Tensor) and t.dim() >= 1 else 0, base_out)
        in_dims = tuple(leaves[i].pdim for i in batched)
        out = vmap(one, in_dims=in_dims, out_dims=out_dims)(*[leaves[i].x for i in batched])
        return tree_map(_Dense, out, out_dims)


# ------------------------------------------------------------------------------ helpers


def _rep_bytes(v: Any) -> int:
    if isinstance(v, (_Dense, _Channel)):
        return v.nbytes()
    if isinstance(v, (tuple, list)):
        return sum(_rep_bytes(t) for t in v)
    return 0


def _storage_ptrs(v: Any) -> set[int]:
    if isinstance(v, _Dense):
        return {v.x.untyped_storage().data_ptr()}
    if isinstance(v, _Channel):
        return {v.values.untyped_storage().data_ptr()}
    if isinstance(v, (tuple, list)):
        return set().union(*(_storage_ptrs(t) for t in v)) if v else set()
    return set()


def _is_relu(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return type(modules[n.target]) is nn.ReLU
    if n.op == "call_method":
        return n.target == "relu"
    return n.target in (F.relu, torch.relu)


# Mean rows (batch x perturbations) per channel run from which a linear layer takes one matrix product
# per run instead of one per perturbation (measured: 64 x 73 rows per run 2x faster; 16 x 13 3x slower).
_LINEAR_RUN_ROWS = 1024
# Whether the traced graph runs max-pooling before the ReLU that feeds it (`_pool_before_relu`).
_COMMUTE_RELU_POOL = True

_ONE_CHANNEL_ENTRIES = {"conv_weight", "conv_bias", "linear_weight", "linear_bias", "bn_weight", "bn_bias"}


def _merge_channels(reps: list[_Channel], positions: list[Tensor]) -> tuple[_Channel, Tensor]:
    """One-channel values of several blocks at one node as one, sorted by channel (stable), so that
    the perturbations of each channel stay adjacent; with their positions in the same order."""
    channel = torch.cat([r.channel for r in reps])
    values = torch.cat([r.values for r in reps], 1)
    pos = torch.cat(positions)
    order = torch.argsort(channel, stable=True)
    first = reps[0]
    merged = _Channel(first.base, first.nch, first.spatial, False, channel.index_select(0, order),
                      values.index_select(1, order))
    return merged, pos.index_select(0, order)


class _PendingLosses:
    """The perturbed outputs of a `coordinate_losses` call, turned into losses together: one
    cross-entropy call for all chunks (or the loss function vmapped per chunk), written to `out` at
    their positions. Flushed when the held outputs pass the chunk memory cap."""

    def __init__(self, engine: "FeatureReuse", st: _BaseState, out: Tensor):
        self.engine, self.st, self.out = engine, st, out
        self.items: list[tuple[_Dense, Tensor]] = []
        self.nbytes = 0

    def add(self, res: _Dense, pos: Tensor, label: str | None) -> None:
        self.items.append((res, pos))
        self.nbytes += res.nbytes()
        if self.nbytes > self.engine._cap_bytes():
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        eng, st, items = self.engine, self.st, self.items
        self.items, self.nbytes = [], 0
        tm = eng.timings
        t0 = time.process_time() if tm is not None else 0.0
        y = st.y
        if (eng.loss_fn is F.cross_entropy and all(r.pdim in (0, 1) for r, _ in items)
                and all(eng._class_targets(st, r.x.dim()) for r, _ in items)):
            losses = _cross_entropy_per_perturbation([(r.x, r.pdim) for r, _ in items], y)
            self.out[torch.cat([p for _, p in items])] = losses
        else:
            for r, pos in items:
                self.out[pos] = vmap(lambda o: eng.loss_fn(o, y), in_dims=r.pdim)(r.x)
        if tm is not None:
            _tick(tm, ("(all blocks)", "loss (all chunks together)"), t0, time.process_time)


def _cross_entropy_per_perturbation(outs: list[tuple[Tensor, int]], y: Tensor) -> Tensor:
    """vmap(F.cross_entropy(., y), in_dims=pdim)(out) for each (out, pdim) of `outs`, concatenated,
    without vmap: the same kernels on the same memory layout as the batching rules use ([P, N, C]
    contiguous: log_softmax over C, gather, sum over N, divide by the number of targets), so the same
    bits (tests/test_reuse.py checks torch.equal), without the interpreter cost of vmap and of the
    nll_loss decomposition, which was a third of a digits training step (docs/performance.md). All
    outputs in one call: the rows are independent.

    For few classes the log_softmax runs over dim 0 of a [C, rows] copy instead, where that gives
    the same bits as the last-dimension kernel (`_log_softmax_dim0_is_exact`): 20x faster for 10
    classes."""
    first, pdim0 = outs[0]
    n, c = first.shape[1 - pdim0], first.shape[2]
    p_total = sum(x.shape[pdim] for x, pdim in outs)
    if _log_softmax_dim0_is_exact(c, first.dtype, first.device):
        rows = p_total * n
        padded = -(-rows // _ROW_PAD) * _ROW_PAD
        xt = first.new_empty((c, padded))
        xt[:, rows:].zero_()  # padding columns: any finite values
        labels, pieces, col = [], [], 0
        for x, pdim in outs:
            p = x.shape[pdim]
            cols = xt[:, col:col + p * n]
            if pdim == 1 and p * n * c > _TRANSPOSE_2D:
                # [N, P, C] -> columns in (n, p) order: a 2-D transpose, 3x faster than the 3-D one when large
                cols.copy_(x.reshape(n * p, c).t())
                labels.append(y.repeat_interleave(p))
                pieces.append((col, p, True))
            else:  # columns in (p, n) order
                cols.view(c, p, n).copy_(x.permute(2, pdim, 1 - pdim))
                labels.append(y.repeat(p))
                pieces.append((col, p, False))
            col += p * n
        # column r of log_softmax(xt, 0) holds row r's log-probabilities. Computed in blocks of columns
        # that stay in the CPU's L2 cache (the kernel passes over its input three times: max, sum of
        # exp, output): each column's arithmetic does not depend on the others or on where its block
        # starts (blocks are whole multiples of the padding), so the same bits, 1.3x faster on 250K rows
        label = torch.cat(labels).view(1, rows)
        block = _softmax_block_columns(c, xt.element_size())
        if padded <= block:
            picked = torch.log_softmax(xt, 0)[:, :rows].gather(0, label).view(rows)
        else:
            picked = xt.new_empty(rows)
            for a in range(0, rows, block):
                b = min(a + block, padded)
                ls = torch.log_softmax(xt[:, a:b], 0)
                e = min(b, rows)
                picked[a:e] = ls[:, :e - a].gather(0, label[:, a:e]).view(e - a)
        nll = torch.cat([picked[a:a + p * n].view(n, p).t() if np_order else picked[a:a + p * n].view(p, n)
                         for a, p, np_order in pieces]).contiguous()  # [P, N], as the reference layout
        return -nll.sum(1) / n
    x = torch.cat([x.movedim(pdim, 0) for x, pdim in outs]) if len(outs) > 1 else first.movedim(pdim0, 0)
    x = x.contiguous()
    nll = -torch.log_softmax(x, 2).gather(2, y.view(1, n, 1).expand(p_total, n, 1)).squeeze(2)
    return nll.sum(1) / n


# Rows of the dim-0 layout are padded to a multiple of this, so that the kernel runs every row in
# full vector registers (a partial last vector would take a scalar exp with other rounding).
_ROW_PAD = 64
# Bytes of one block of columns of the dim-0 log_softmax (see `_cross_entropy_per_perturbation`).
_SOFTMAX_BLOCK_BYTES = 256 * 2**10


def _softmax_block_columns(classes: int, element_size: int) -> int:
    """Columns per block of the dim-0 log_softmax: about _SOFTMAX_BLOCK_BYTES, a multiple of _ROW_PAD."""
    return max(_ROW_PAD, _SOFTMAX_BLOCK_BYTES // (classes * element_size) // _ROW_PAD * _ROW_PAD)


# Above this many logits per output, its transposing copy goes (n, p)-major (a 2-D transpose).
_TRANSPOSE_2D = 2**16
_DIM0_EXACT: dict[tuple[int, torch.dtype, str], bool] = {}


def _log_softmax_dim0_is_exact(c: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether log_softmax over dim 0 of a [c, rows] tensor gives, column by column, the same bits as
    log_softmax over the last dimension of the [rows, c] tensor, on this machine and dtype.

    Why it can: on CPU, torch's last-dimension kernel reduces a row shorter than one vector register
    (10 float32 classes under AVX-512) element by element in order (max, then the sum of exp(x - max)
    left to right, then log), and its other-dimension kernel does the same per column, vectorized
    across the columns with the same exp and log; for longer rows (float64, AVX2) the orders differ.
    So this is checked, once per (classes, dtype, device), on random rows of varied scale; where the
    bits differ the caller keeps the last-dimension kernel. Only CPU is considered (on a GPU the
    kernel launch, not the row, is the cost)."""
    key = (c, dtype, str(device))
    if key not in _DIM0_EXACT:
        ok = False
        if device.type == "cpu" and dtype in (torch.float32, torch.float64) and 2 <= c <= 64:
            g = torch.Generator().manual_seed(0)
            rows = 64 * _ROW_PAD
            x = torch.randn(rows, c, generator=g, dtype=dtype) * torch.logspace(-3, 3, rows, dtype=dtype)[:, None]
            x[::7] = x[::7].round()  # ties, and exact zeros after the shift by the maximum
            ok = torch.equal(torch.log_softmax(x, 1), torch.log_softmax(x.t().contiguous(), 0).t())
        _DIM0_EXACT[key] = ok
    return _DIM0_EXACT[key]


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1 and not node.kwargs


def _is_max_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules.get(node.target)
        return type(m) in (nn.MaxPool1d, nn.MaxPool2d) and not m.return_indices
    return (node.op == "call_function" and node.target in (F.max_pool1d, F.max_pool2d)
            and not node.kwargs.get("return_indices", False) and len(node.args) <= 6)


def _pool_before_relu(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Rewrite max_pool(relu(x)) as relu(max_pool(x)) where the ReLU feeds only the pool.

    Exact, value for value: max-pooling selects one element of each window (NaN propagates in
    both), and ReLU is a clamp, monotone, so the clamp of the selected element is the largest
    clamped element (a signed zero may come out as +0 in one order and -0 in the other; no sum
    or product that follows can tell them apart). The ReLU then runs on the pooled values, a
    quarter of them for a 2x2 pool: the digits CNN's ReLU after its second convolution, on every
    perturbation (docs/performance.md, sixth pass)."""
    for relu in list(graph.nodes):
        if not _is_relu(relu, modules) or len(relu.users) != 1:
            continue
        pool = next(iter(relu.users))
        if not _is_max_pool(pool, modules) or pool.args[0] is not relu or relu in pool.args[1:]:
            continue
        if relu in tuple(pool.kwargs.values()):
            continue
        x = relu.args[0]
        pool.args = (x, *pool.args[1:])
        for user in list(pool.users):
            user.replace_input_with(pool, relu)
        relu.args = (pool,)
        relu.prepend(pool)
    graph.lint()


def _direct_kind(m: nn.Module) -> str:
    """conv / linear: an nn.Conv2d or nn.Linear itself, called as its forward does with theta's
    tensors; stateless: no parameters or buffers, so functional_call would only call it; else generic."""
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
        return "generic"
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        return "conv"
    if type(m) is nn.Linear:
        return "linear"
    if (type(m) is nn.MaxPool2d and _pair(m.padding) == (0, 0) and not m.ceil_mode and not m.return_indices):
        return "maxpool"
    if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
        return "stateless"
    return "generic"


def _tick(timings: dict, key: tuple[str, str], since: float, clock: Callable[[], float]) -> float:
    now = clock()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def _has_perturbed(obj: Any) -> bool:
    leaves, _ = tree_flatten(obj)
    return any(_is_perturbed(v) for v in leaves)


def _out_of_place(n: fx.Node) -> Callable[..., Any]:
    if n.op == "call_method":
        name = n.target
        if name.endswith("_") and not name.startswith("_"):
            name = name[:-1]  # x.relu_() -> x.relu(): cached values are never modified
        return lambda self_, *a, **k: getattr(self_, name)(*a, **k)
    return _INPLACE_FUNCS.get(n.target, n.target)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _im2col(x: Tensor, kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
            stride: tuple[int, int]) -> Tensor:
    """F.unfold(x, kernel, dilation, padding, stride) of a 4-D input ([N, C*kh*kw, Ho*Wo], row
    c*kh*kw + a*kw + b holds input channel c shifted by (a, b)), as one copy of a strided view of the
    zero-padded input: the same values (only data movement), and on CPU 5x to 8x faster than the
    im2col kernel on small planes (digits, [64, 8, 8, 8] with 3x3: 0.61 -> 0.08 ms), which a split
    step repeats on every rank that holds coordinates of the layer."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    if x.dim() != 4:
        return F.unfold(x, kernel, dilation, padding, stride)
    xp = F.pad(x, (pw, pw, ph, ph)).contiguous() if ph or pw else x.contiguous()
    n, c, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = xp.stride()
    view = xp.as_strided((n, c, kh, kw, ho, wo), (sn, sc, dh * sy, dw * sx, sh * sy, sw * sx))
    return view.reshape(n, c * kh * kw, ho * wo)


def _max_pool2d_by_slices(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                          dilation: tuple[int, int]) -> Tensor:
    """max_pool2d without padding as elementwise maxima of strided slices, first over the kernel's
    rows, then over its columns (the maximum is separable): the same values (max is exact), and on
    CPU several times faster than the pooling kernel on the many small planes that perturbed channels
    make (2x2 on [N*P, C, 8, 8]: 2.2x faster than the four-slice version, 13x than F.max_pool2d)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    h, w = x.shape[-2:]
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    rows = _max_of_slices([x[..., a * dh: a * dh + sh * (ho - 1) + 1: sh, :] for a in range(kh)])
    return _max_of_slices([rows[..., b * dw: b * dw + sw * (wo - 1) + 1: sw] for b in range(kw)])


def _max_of_slices(slices: list[Tensor]) -> Tensor:
    if len(slices) == 1:
        return slices[0].clone()
    out = torch.maximum(slices[0], slices[1])
    for sl in slices[2:]:
        torch.maximum(out, sl, out=out)
    return out


def _get_attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
