"""Tracing a user's ``nn.Module`` with torch.fx into layer nodes (``ops.LayerNode``).

The tracer keeps every module type of ``ops.LOWERINGS`` (and every other torch.nn module) as
a leaf and records the calls of ``forward``. Each call becomes one of:

* a leaf module of ``LOWERINGS`` (Linear, Conv2d, BatchNorm, Normalize, ReLU, Flatten, pools,
  Identity, Dropout): a node lowered later, with the BatchNorm statistics in force, keyed by its
  qualified name;
* a parameter-free function or tensor method of ``FUNCTIONS`` / ``METHODS``: its op, or
  nothing for an identity (dropout, contiguous, clone), whose readers then read its input;
* ``x.size(0)`` / ``x.shape[0]``: the batch size, allowed only as the first entry of a
  ``view`` / ``reshape``.

Anything else (another module, function or method, a parameter read directly, a second input)
is a ``TypeError`` that names the node and lists what is supported. Nodes that do not reach
the output are dropped.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .ops import (
    BATCHNORM_TYPES, INPUT, LOWERINGS, AddOp, AvgPoolOp, ConcatOp, FlattenOp, LayerNode, MaxPoolOp, ReluOp, ReshapeOp, pool_op,
)


@dataclass(frozen=True)
class _Ref:
    """A traced tensor: the index of the layer node that computes it (INPUT: the input)."""

    index: int


_BATCH = object()  # x.size(0): the batch size
_SHAPE = object()  # x.size() / x.shape: only its entry 0 is used


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in LOWERINGS or super().is_leaf_module(module, qualified_name)


# ----------------------------------------------------------------------------------------------
# Functions and methods: each rule maps the call's arguments (tensors as _Ref) to an op, to a
# _Ref (an identity) or to _BATCH / _SHAPE.


def _bind(name: str, args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    if len(args) > len(names) or set(kwargs) - set(names):
        raise TypeError(f"{name}: unexpected arguments {args[len(names):]} {sorted(set(kwargs) - set(names))}")
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _tensor(value, name: str) -> _Ref:
    if not isinstance(value, _Ref):
        raise TypeError(f"{name} takes traced tensors only, got {value!r}")
    return value


def _relu(name, args, kwargs):
    bound = _bind(name, args, kwargs, ("input", "inplace"), {"inplace": False})
    return ReluOp(), (_tensor(bound["input"], name),)


def _add(name, args, kwargs):
    bound = _bind(name, args, kwargs, ("input", "other", "alpha"), {"alpha": 1})
    if bound["alpha"] != 1:
        raise TypeError(f"{name}: only alpha=1")
    return AddOp(), (_tensor(bound["input"], name), _tensor(bound["other"], name))


def _cat(name, args, kwargs):
    bound = _bind(name, args, kwargs, ("tensors", "dim"), {"dim": 0})
    if bound["dim"] != 1:
        raise TypeError(f"{name}: only concatenation along the channel dim 1, got dim={bound['dim']}")
    inputs = tuple(_tensor(value, name) for value in bound["tensors"])
    return (ConcatOp(), inputs) if len(inputs) > 1 else (None, inputs)


def _flatten(name, args, kwargs):
    bound = _bind(name, args, kwargs, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    if bound["start_dim"] != 1 or bound["end_dim"] != -1:
        raise TypeError(f"{name}: only flatten(x, 1) (start_dim=1, end_dim=-1)")
    return FlattenOp(), (_tensor(bound["input"], name),)


def _reshape(name, args, kwargs):
    """view / reshape (x, n, d1, ...) or (x, (n, d1, ...)) with n the batch size or -1."""
    source = _tensor(args[0], name)
    shape = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else tuple(args[1:])
    shape = tuple(kwargs.get("shape", shape))
    rest = shape[1:]
    batch_ok = shape and (shape[0] is _BATCH or (shape[0] == -1 and -1 not in rest))
    if not batch_ok or not all(isinstance(size, int) for size in rest):
        raise TypeError(f"{name}: the shape must be (x.size(0) or -1, d1, d2, ...) with integer d_i, got {shape}")
    return (FlattenOp() if rest == (-1,) else ReshapeOp(rest)), (source,)


def _avg_pool(name, args, kwargs):
    bound = _bind(name, args, kwargs, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                       "divisor_override"),
                  {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                   "divisor_override": None})
    op = pool_op(AvgPoolOp, name, bound["kernel_size"], bound["stride"], bound["padding"], bound["ceil_mode"],
                 count_include_pad=bound["count_include_pad"], divisor_override=bound["divisor_override"])
    return op, (_tensor(bound["input"], name),)


def _max_pool(name, args, kwargs):
    bound = _bind(name, args, kwargs, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                       "return_indices"),
                  {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    if bound["return_indices"]:
        raise TypeError(f"{name}: return_indices=True is not supported")
    op = pool_op(MaxPoolOp, name, bound["kernel_size"], bound["stride"], bound["padding"], bound["ceil_mode"],
                 bound["dilation"])
    return op, (_tensor(bound["input"], name),)


def _identity(name, args, kwargs):
    return None, (_tensor(args[0] if args else kwargs.get("input"), name),)


def _size(name, args, kwargs):
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:
        return _SHAPE
    if dim != 0:
        raise TypeError(f"{name}: only the batch size x.size(0) may be read")
    return _BATCH


def _getitem(name, args, kwargs):
    if args[0] is _SHAPE and args[1] == 0:
        return _BATCH
    raise TypeError(f"{name}: indexing is supported only as x.shape[0] / x.size()[0] (the batch size)")


def _shape_attribute(name: str, args: tuple, kwargs: dict):
    if args[1] == "shape":
        return _SHAPE
    raise TypeError(f"{name}: reading the attribute {args[1]!r} of a tensor is not supported")


Rule = Callable[[str, tuple, dict], Any]

FUNCTIONS: dict[Callable, Rule] = {
    F.relu: _relu, torch.relu: _relu,
    operator.add: _add, torch.add: _add,
    torch.cat: _cat, torch.concat: _cat,
    torch.flatten: _flatten, torch.reshape: _reshape,
    F.avg_pool2d: _avg_pool, F.max_pool2d: _max_pool, torch.max_pool2d: _max_pool,
    F.dropout: _identity,
    operator.getitem: _getitem, getattr: _shape_attribute,
}

METHODS: dict[str, Rule] = {
    "relu": _relu, "add": _add, "flatten": _flatten, "view": _reshape, "reshape": _reshape,
    "contiguous": _identity, "clone": _identity, "size": _size,
}


def _supported() -> str:
    modules = ", ".join(sorted(t.__name__ for t in LOWERINGS))
    functions = ", ".join(sorted({getattr(f, "__name__", str(f)) for f in FUNCTIONS} - {"getitem", "getattr"}))
    methods = ", ".join(f".{name}" for name in sorted(METHODS))
    return (f"supported modules: {modules}; functions: {functions} (and +); tensor methods: {methods}; "
            f"x.shape[0] / x.size(0) as the batch size of a view")


def _unsupported(node: fx.Node, what: str) -> TypeError:
    return TypeError(f"node {node.name!r} ({what}) cannot be lowered; {_supported()}")


# ----------------------------------------------------------------------------------------------
# The trace


@dataclass
class _Layers:
    nodes: list[LayerNode]
    batchnorms_seen: set[int]

    def add(self, node: LayerNode) -> _Ref:
        self.nodes.append(node)
        return _Ref(len(self.nodes) - 1)


def _resolve(value, values: dict[fx.Node, Any]):
    return fx.node.map_arg(value, lambda node: values[node])


def _module_node(layers: _Layers, root: nn.Module, node: fx.Node, values) -> _Ref:
    module = root.get_submodule(node.target)
    if type(module) not in LOWERINGS:
        raise _unsupported(node, f"module {node.target}: {type(module).__name__}")
    if isinstance(module, BATCHNORM_TYPES):
        if id(module) in layers.batchnorms_seen:
            raise TypeError(f"node {node.name!r}: BatchNorm {node.target} is called twice; give each call its own "
                            f"BatchNorm (batch statistics are kept per module)")
        layers.batchnorms_seen.add(id(module))
    args = _resolve(node.args, values)
    if len(args) != 1 or node.kwargs:
        raise TypeError(f"node {node.name!r}: module {node.target} must be called on one tensor")
    return layers.add(LayerNode((_tensor(args[0], node.name).index,), module, node.target))


def _function_node(layers: _Layers, node: fx.Node, values):
    rule = FUNCTIONS.get(node.target) if node.op == "call_function" else METHODS.get(node.target)
    if rule is None:
        kind = "function" if node.op == "call_function" else "tensor method"
        raise _unsupported(node, f"{kind} {getattr(node.target, '__name__', node.target)}")
    args, kwargs = _resolve(node.args, values), _resolve(node.kwargs, values)
    try:
        result = rule(node.name, tuple(args), dict(kwargs))
    except (TypeError, ValueError) as error:
        raise TypeError(f"node {node.name!r}: {error}") from None
    if not isinstance(result, tuple):
        return result  # _BATCH or _SHAPE
    op, inputs = result
    if op is None:
        return inputs[0]
    return layers.add(LayerNode(tuple(ref.index for ref in inputs), op=op))


def _traced_layers(model: nn.Module) -> tuple[list[LayerNode], int]:
    graph = _Tracer().trace(model)
    layers = _Layers([], set())
    values: dict[fx.Node, Any] = {}
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if _Ref(INPUT) in values.values():
                raise TypeError(f"node {node.name!r}: ctbench networks take one input tensor")
            values[node] = _Ref(INPUT)
        elif node.op == "call_module":
            values[node] = _module_node(layers, model, node, values)
        elif node.op in ("call_function", "call_method"):
            values[node] = _function_node(layers, node, values)
        elif node.op == "get_attr":
            raise TypeError(f"node {node.name!r} reads {node.target} directly; wrap parameters and buffers in a "
                            f"module ({_supported()})")
        elif node.op == "output":
            output = _tensor(_resolve(node.args[0], values), f"the output ({node.name})").index
    if output is None or output == INPUT:
        raise TypeError("the network must compute its output from its input with at least one layer")
    return layers.nodes, output


def _reaching(nodes: list[LayerNode], output: int) -> tuple[LayerNode, ...]:
    """The nodes the output depends on, renumbered in order."""
    needed = {output}
    for index in range(output, -1, -1):
        if index in needed:
            needed.update(source for source in nodes[index].inputs if source != INPUT)
    kept = sorted(needed)
    renumber = {INPUT: INPUT, **{old: new for new, old in enumerate(kept)}}
    return tuple(LayerNode(tuple(renumber[s] for s in nodes[i].inputs), nodes[i].module, nodes[i].key, nodes[i].op)
                 for i in kept)


def trace_layers(model: nn.Module) -> tuple[LayerNode, ...]:
    """The layer nodes of ``model`` traced with torch.fx (module docstring)."""
    nodes, output = _traced_layers(model)
    return _reaching(nodes, output)

