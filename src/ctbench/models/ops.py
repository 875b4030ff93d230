"""A network lowered to primitive operations that are plain values.

Every pass of ctbench (clean forward, attacks, IBP, CROWN) runs on the same lowered form, so
BatchNorm statistics are chosen once, when lowering, and never stored on modules:

* ``clean_forward`` runs the model on a clean batch and returns the batch statistics of every
  BatchNorm layer (with gradients);
* ``lower_network(model, bn_stats)`` turns each layer into an op; BatchNorm and the input
  normalization become a per-channel affine map using the statistics in force (the given
  clean-batch statistics, or the model's population/running statistics when none are given).

**Chains and DAGs.** An ``nn.Sequential`` of layers in ``LOWERINGS`` lowers, layer by layer, to
a *chain*: a tuple of ops, op k reading the output of op k-1. Any other module is traced with
torch.fx (``models.trace``) into a ``Graph``: nodes in topological order, node k holding an op
and the indices of the nodes it reads (``INPUT`` = -1 is the network input); the output is the
last node. A traced network that is a chain (every node reads the one before it) is returned as
the tuple, so a chain is the same value whichever way it was written. Every pass takes either
form (``Network``); ``as_graph`` views a chain as the Graph whose node k reads k - 1, so node
indices and op indices agree. "The input of node k" means its first input (its only one except
for ``AddOp`` and ``ConcatOp``, the ops of several inputs: ``NARY_OPS``).

Adding a layer type is one ``LOWERINGS`` entry here (or a function rule in ``models.trace``)
plus one rule per bound domain.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Normalize


@dataclass(frozen=True, eq=False)
class LinearOp:
    weight: Tensor  # (out, in)
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True, eq=False)
class ConvOp:
    weight: Tensor  # (out, in, kh, kw)
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]

    def __call__(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


@dataclass(frozen=True, eq=False)
class ChannelAffineOp:
    """y = x * scale + shift per channel (dim 1): BatchNorm with fixed statistics, Normalize."""

    scale: Tensor  # (C,)
    shift: Tensor  # (C,)

    def broadcast(self, tensor: Tensor, ndim: int) -> Tensor:
        return tensor.view(1, -1, *([1] * (ndim - 2)))

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.broadcast(self.scale, x.dim()) + self.broadcast(self.shift, x.dim())


@dataclass(frozen=True, eq=False)
class ReluOp:
    def __call__(self, x: Tensor) -> Tensor:
        return torch.relu(x)


@dataclass(frozen=True, eq=False)
class FlattenOp:
    def __call__(self, x: Tensor) -> Tensor:
        return x.flatten(1)


@dataclass(frozen=True, eq=False)
class ReshapeOp:
    """Each sample reshaped to ``shape`` (at most one -1): ``x.view(x.size(0), *shape)``."""

    shape: tuple[int, ...]

    def __call__(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


@dataclass(frozen=True, eq=False)
class AvgPoolOp:
    """Average pooling with zero padding counted in the mean (torch's default): a linear map,
    y = (1 / kh kw) sum of the window."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    def __call__(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding)


@dataclass(frozen=True, eq=False)
class MaxPoolOp:
    """Max pooling (padding with -inf, as torch's): y = max of the window."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    def __call__(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding)


@dataclass(frozen=True, eq=False)
class AddOp:
    """y = a + b: a residual connection."""

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


@dataclass(frozen=True, eq=False)
class ConcatOp:
    """The inputs concatenated along the channel dim 1."""

    def __call__(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=1)


Op = (LinearOp | ConvOp | ChannelAffineOp | ReluOp | FlattenOp | ReshapeOp | AvgPoolOp | MaxPoolOp | AddOp
      | ConcatOp)
NARY_OPS = (AddOp, ConcatOp)  # ops of several inputs; every other op reads one

INPUT = -1  # the input index that names the network input


@dataclass(frozen=True, eq=False)
class Node:
    """One node of a Graph: ``op`` applied to the values of the nodes ``inputs``."""

    op: Op
    inputs: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Graph:
    """A DAG of ops: nodes in topological order (a node reads only earlier nodes or ``INPUT``);
    the output is the last node (the input itself when there is none)."""

    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        for index, node in enumerate(self.nodes):
            arity_ok = len(node.inputs) >= 2 if isinstance(node.op, NARY_OPS) else len(node.inputs) == 1
            if not arity_ok or any(not INPUT <= source < index for source in node.inputs):
                raise ValueError(f"node {index} ({type(node.op).__name__}) reads {node.inputs}: a node reads "
                                 f"earlier nodes or INPUT, one of them unless it is an add or a concatenation")

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def ops(self) -> tuple[Op, ...]:
        return tuple(node.op for node in self.nodes)

    def prefix(self, count: int) -> "Graph":
        """The first ``count`` nodes: the graph that computes node count - 1."""
        return Graph(self.nodes[:count])

    def consumers(self) -> list[int]:
        """How many times each node is read."""
        counts = [0] * len(self.nodes)
        for node in self.nodes:
            for source in node.inputs:
                if source != INPUT:
                    counts[source] += 1
        return counts

    def is_chain(self) -> bool:
        return all(node.inputs == (index - 1,) for index, node in enumerate(self.nodes))


Network = Sequence[Op] | Graph


def as_graph(network: Network) -> Graph:
    """The network as a Graph; a chain of ops becomes the graph whose node k reads node k - 1."""
    if isinstance(network, Graph):
        return network
    return Graph(tuple(Node(op, (index - 1,)) for index, op in enumerate(network)))


def as_network(graph: Graph) -> Network:
    """A chain graph as the tuple of its ops (the chain form every chain-only pass takes), any
    other graph unchanged."""
    return graph.ops if graph.is_chain() else graph


def is_dag(network: Network) -> bool:
    """True for a Graph that is not a chain."""
    return isinstance(network, Graph) and not network.is_chain()


def network_ops(network: Network) -> tuple[Op, ...]:
    """The ops, in node order."""
    return network.ops if isinstance(network, Graph) else tuple(network)


def network_prefix(network: Network, count: int) -> Network:
    """The part of the network that computes node ``count - 1`` (its first ``count`` nodes)."""
    return network.prefix(count) if isinstance(network, Graph) else tuple(network[:count])


def with_ops(network: Network, ops: Sequence[Op]) -> Network:
    """The network with its ops replaced, node for node (same structure)."""
    if isinstance(network, Graph):
        return Graph(tuple(Node(op, node.inputs) for op, node in zip(ops, network.nodes, strict=True)))
    return tuple(ops)


def source_of(network: Network, index: int) -> int:
    """The index of the (first) input of node ``index``; ``INPUT`` for the network input."""
    return network.nodes[index].inputs[0] if isinstance(network, Graph) else index - 1


def node_inputs(values: Sequence, network_input, node: Node) -> list:
    """The values a node reads: ``values[i]`` for an earlier node i, ``network_input`` for INPUT."""
    return [network_input if source == INPUT else values[source] for source in node.inputs]


def apply_op(op: Op, inputs: Sequence):
    """An op applied to the values it reads (an n-ary op to all of them)."""
    return op(*inputs) if isinstance(op, NARY_OPS) else op(inputs[0])


def require_ops(network: Network, supported: tuple[type, ...], what: str) -> Network:
    """The network (a chain or a DAG) when all its ops are of the ``supported`` types, else a
    TypeError that says ``what`` handles only those."""
    other = sorted({type(op).__name__ for op in network_ops(network) if not isinstance(op, supported)})
    if other:
        raise TypeError(f"{what} does not handle {', '.join(other)}; it supports "
                        + ", ".join(t.__name__ for t in supported))
    return network


def require_chain(network: Network, supported: tuple[type, ...], what: str) -> tuple[Op, ...]:
    """The network as a chain of ops of the ``supported`` types, else a TypeError that says
    ``what`` handles only those."""
    if is_dag(network):
        raise TypeError(f"{what} works on chain networks only (each layer reading the one before it); this "
                        f"network is a DAG (residual connections or concatenations)")
    return network_ops(require_ops(network, supported, what))


@dataclass(frozen=True)
class BatchNormStats:
    """Mean and (biased) variance of the input of each BatchNorm layer, keyed by its index in
    the Sequential (its qualified module name in a traced module: ``LayerNode.key``). Tensors
    keep their autograd history, so gradients flow through them."""

    per_layer: Mapping[int | str, tuple[Tensor, Tensor]]

    def detached(self) -> "BatchNormStats":
        return BatchNormStats({i: (m.detach(), v.detach()) for i, (m, v) in self.per_layer.items()})


def _maybe_detach(tensor: Tensor | None, detach: bool) -> Tensor | None:
    return tensor.detach() if (detach and tensor is not None) else tensor


def _lower_linear(layer: nn.Linear, stats, detach: bool) -> Op:
    return LinearOp(_maybe_detach(layer.weight, detach), _maybe_detach(layer.bias, detach))


def _lower_conv(layer: nn.Conv2d, stats, detach: bool) -> Op:
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
        raise ValueError(f"unsupported Conv2d {layer}: only groups=1, dilation=1, zero padding")
    if isinstance(layer.padding, str):
        raise ValueError(f"unsupported Conv2d {layer}: give padding as integers")
    return ConvOp(
        _maybe_detach(layer.weight, detach), _maybe_detach(layer.bias, detach),
        tuple(layer.stride), tuple(layer.padding),
    )


def _lower_batchnorm(layer: nn.modules.batchnorm._BatchNorm, stats, detach: bool) -> Op:
    if stats is None:
        if layer.running_mean is None:
            raise ValueError(f"{layer} tracks no running statistics and no batch statistics were given")
        mean, var = layer.running_mean, layer.running_var
    else:
        mean, var = stats
    weight = layer.weight if layer.affine else torch.ones_like(mean)
    bias = layer.bias if layer.affine else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + layer.eps)
    shift = bias - mean * scale
    return ChannelAffineOp(_maybe_detach(scale, detach), _maybe_detach(shift, detach))


def _lower_normalize(layer: Normalize, stats, detach: bool) -> Op:
    std = layer.std.flatten()
    return ChannelAffineOp(1.0 / std, -layer.mean.flatten() / std)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def pool_op(kind: type, layer_name: str, kernel, stride, padding, ceil_mode: bool = False, dilation=1,
            count_include_pad: bool = True, divisor_override=None) -> Op:
    """An AvgPoolOp or MaxPoolOp; the variants without one (ceil mode, dilation, a mean over
    the unpadded part of a window, a divisor) are refused, naming ``layer_name``."""
    kernel, padding = _pair(kernel), _pair(padding)
    stride = kernel if stride is None or stride == [] else _pair(stride)
    exact_mean = count_include_pad or padding == (0, 0)
    if ceil_mode or _pair(dilation) != (1, 1) or not exact_mean or divisor_override is not None:
        raise ValueError(f"unsupported pooling {layer_name}: only ceil_mode=False, dilation=1, and for average "
                         f"pooling count_include_pad=True (or no padding) without divisor_override")
    return kind(kernel, stride, padding)


def _lower_avg_pool(layer: nn.AvgPool2d, stats, detach: bool) -> Op:
    return pool_op(AvgPoolOp, repr(layer), layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                   count_include_pad=layer.count_include_pad, divisor_override=layer.divisor_override)


def _lower_max_pool(layer: nn.MaxPool2d, stats, detach: bool) -> Op:
    if layer.return_indices:
        raise ValueError(f"unsupported pooling {layer}: return_indices=True")
    return pool_op(MaxPoolOp, repr(layer), layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                   layer.dilation)


def _lower_flatten(layer: nn.Flatten, stats, detach: bool) -> Op:
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise ValueError(f"unsupported {layer}: only start_dim=1, end_dim=-1 (use a view for other shapes)")
    return FlattenOp()


LOWERINGS: dict[type, Callable[..., Op | None]] = {
    nn.Linear: _lower_linear,
    nn.Conv2d: _lower_conv,
    nn.BatchNorm1d: _lower_batchnorm,
    nn.BatchNorm2d: _lower_batchnorm,
    Normalize: _lower_normalize,
    nn.ReLU: lambda layer, stats, detach: ReluOp(),
    nn.Flatten: _lower_flatten,
    nn.AvgPool2d: _lower_avg_pool,
    nn.MaxPool2d: _lower_max_pool,
    # Identity-like layers vanish from the lowered network.
    nn.Identity: lambda layer, stats, detach: None,
    nn.Dropout: lambda layer, stats, detach: None,
}

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True, eq=False)
class LayerNode:
    """A layer of a model before lowering: a leaf ``module`` (lowered by ``LOWERINGS`` with the
    BatchNorm statistics in force) or a parameter-free ``op`` (a traced function), reading
    earlier layer nodes (``INPUT``: the network input). ``key`` names a BatchNorm layer's
    statistics: its index in a Sequential, its qualified name in a traced module."""

    inputs: tuple[int, ...]
    module: nn.Module | None = None
    key: int | str | None = None
    op: Op | None = None


def _is_plain_chain(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and all(type(layer) in LOWERINGS for layer in model)


def layer_nodes(model: nn.Module) -> tuple[LayerNode, ...]:
    """The layers of ``model`` in order: an nn.Sequential of ``LOWERINGS`` layers layer by
    layer (keys: indices), any other module traced with torch.fx (``models.trace``)."""
    if _is_plain_chain(model):
        return tuple(LayerNode((index - 1,), layer, index) for index, layer in enumerate(model))
    from .trace import trace_layers

    return trace_layers(model)


def assemble(nodes: Sequence[LayerNode], lower: Callable[[LayerNode], Op | None]) -> Network:
    """The network of the ops ``lower`` gives each layer node; a node lowered to None (an
    identity) vanishes and its readers read its input. A chain comes back as the tuple of ops."""
    graph_nodes: list[Node] = []
    where = {INPUT: INPUT}
    for index, layer in enumerate(nodes):
        inputs = tuple(where[source] for source in layer.inputs)
        op = lower(layer)
        if op is None:
            where[index] = inputs[0]
            continue
        graph_nodes.append(Node(op, inputs))
        where[index] = len(graph_nodes) - 1
    if not graph_nodes:
        return ()
    return as_network(Graph(tuple(graph_nodes)))


def _layer_stats(layer: LayerNode, bn_stats: BatchNormStats | None):
    if bn_stats is None or not isinstance(layer.module, BATCHNORM_TYPES):
        return None
    if layer.key not in bn_stats.per_layer:
        raise KeyError(f"no batch statistics for BatchNorm layer {layer.key}")
    return bn_stats.per_layer[layer.key]


def lower_network(model: nn.Module, bn_stats: BatchNormStats | None = None, detach: bool = False,
                  fold: bool = False) -> Network:
    """Lower ``model`` to ops: a tuple for a chain, a ``Graph`` for a DAG (module docstring).
    BatchNorm uses ``bn_stats`` when given, else the model's running (population) statistics.
    ``detach`` cuts parameters out of the autograd graph, for passes (attacks) that need
    gradients only with respect to the input. ``fold`` merges each BatchNorm into the
    Linear/Conv before it (``fold_affine``)."""

    def lower(layer: LayerNode) -> Op | None:
        if layer.module is None:
            return layer.op
        return LOWERINGS[type(layer.module)](layer.module, _layer_stats(layer, bn_stats), detach)

    network = assemble(layer_nodes(model), lower)
    return fold_affine(network) if fold else network


def batchnorm_layers(model: nn.Module) -> dict[int | str, nn.Module]:
    """The BatchNorm layers of ``model`` by their statistics key (``LayerNode.key``)."""
    return {layer.key: layer.module for layer in layer_nodes(model) if isinstance(layer.module, BATCHNORM_TYPES)}


def _fold(op: Op, affine: ChannelAffineOp) -> Op:
    """affine(op(x)) as one op: W' = s W (per output channel), b' = s b + t."""
    scale = affine.scale.view(-1, *([1] * (op.weight.dim() - 1)))
    bias = affine.shift if op.bias is None else op.bias * affine.scale + affine.shift
    return dataclasses.replace(op, weight=op.weight * scale, bias=bias)


def fold_affine(network: Network) -> Network:
    """Fold every per-channel affine op (BatchNorm with fixed statistics) that reads a Linear
    or Conv read by nothing else into its weights: the same function with fewer passes over the
    activations. An identity affine map (mean 0, std 1) is dropped unless it is the output.
    Differentiable: gradients reach the weights, the BatchNorm parameters and statistics. A
    chain stays a chain."""
    graph = as_graph(network)
    readers = graph.consumers()
    nodes: list[Node] = []
    new_readers: list[int] = []
    where = {INPUT: INPUT}
    for index, node in enumerate(graph.nodes):
        inputs = tuple(where[source] for source in node.inputs)
        source = inputs[0]
        producer = nodes[source] if source != INPUT else None
        if (isinstance(node.op, ChannelAffineOp) and producer is not None
                and isinstance(producer.op, (LinearOp, ConvOp)) and new_readers[source] == 1):
            nodes[source] = Node(_fold(producer.op, node.op), producer.inputs)
            new_readers[source] = readers[index]
            where[index] = source
        elif (isinstance(node.op, ChannelAffineOp) and _is_identity(node.op)
              and (index < len(graph.nodes) - 1 or source == len(nodes) - 1)):
            # e.g. the normalization under data.normalize=false (mean 0, std 1)
            where[index] = source
            if source != INPUT:
                new_readers[source] += readers[index] - 1
        else:
            nodes.append(Node(node.op, inputs))
            new_readers.append(readers[index])
            where[index] = len(nodes) - 1
    if not nodes:
        return ()
    return as_network(Graph(tuple(nodes)))


def _is_identity(op: ChannelAffineOp) -> bool:
    return not op.scale.requires_grad and bool((op.scale == 1).all() and (op.shift == 0).all())


def run_ops(network: Network, x: Tensor) -> Tensor:
    """The network's output at ``x``."""
    if not isinstance(network, Graph):
        for op in network:
            x = op(x)
        return x
    values: list[Tensor] = []
    for node in network.nodes:
        values.append(apply_op(node.op, node_inputs(values, x, node)))
    return values[-1]


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but the channel dim 1.

    On CPU, torch.var_mean's Welford kernel takes about twice as long as two plain means (and
    longer still over a channels-last batch), so the variance is E[d^2] - E[d]^2 of d = x - s,
    shifted by one sample's values s so that it does not cancel when |mean| >> std."""
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
        return mean, var
    if x.dim() > 2 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        x = x.movedim(1, -1).reshape(-1, x.shape[-3])  # a view: one row per pixel
    dims = [d for d in range(x.dim()) if d != 1]
    shift = x.detach()[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.dim() - 2)]
    shifted = x - shift
    mean = shifted.mean(dims)
    var = ((shifted * shifted).mean(dims) - mean * mean).clamp(min=0)
    return mean + shift.flatten(), var


Statistics = Callable[[Tensor], tuple[Tensor, Tensor]]


def clean_forward(model: nn.Module, x: Tensor,
                  statistics: Statistics = batch_statistics) -> tuple[Tensor, BatchNormStats]:
    """Forward pass in training mode: every BatchNorm normalizes with the statistics of this
    batch. Returns the logits and those statistics, to be reused by every other pass of the step.
    ``statistics`` maps a BatchNorm input to its per-channel mean and biased variance: this
    batch's own by default; in data-parallel training, those of the global batch over all ranks."""
    stats: dict[int | str, tuple[Tensor, Tensor]] = {}
    values: list[Tensor] = []
    for layer in layer_nodes(model):
        inputs = node_inputs(values, x, layer)
        if isinstance(layer.module, BATCHNORM_TYPES):
            stats[layer.key] = statistics(inputs[0])
            values.append(_lower_batchnorm(layer.module, stats[layer.key], detach=False)(inputs[0]))
        elif layer.module is not None:
            values.append(layer.module(*inputs))
        else:
            values.append(apply_op(layer.op, inputs))
    return (values[-1] if values else x), BatchNormStats(stats)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BATCHNORM_TYPES) for m in model.modules())
