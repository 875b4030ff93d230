"""Networks from elsewhere: an ONNX file rebuilt as a torch module ctbench lowers.

``import_onnx(path, image_shape)`` reads the ONNX graph with the ``onnx`` package and rebuilds
it, node by node, as a torch.fx ``GraphModule`` made only of the modules and functions the
tracer lowers (``models.trace``), so IBP, CROWN, attacks, evaluation and every certification
stage run on it as on a trained ctbench network, and its ``state_dict`` holds the ONNX weights
(the certification provenance hashes them). The ONNX ops and what they become:

* Gemm (transA = 0), MatMul by a constant matrix: ``nn.Linear``; Conv (2-d, group 1,
  dilation 1, symmetric pads): ``nn.Conv2d``; an Add or Sub of a constant right after either
  (read by nothing else) goes into its bias;
* BatchNormalization (inference): ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` with its statistics;
* Add, Sub, Mul, Div by a constant that is the same over each channel (input normalization):
  a per-channel affine map, written as a BatchNorm with mean 0, variance 1 and eps 0;
* Relu, Flatten (axis 1), Reshape to a shape that keeps the batch dim first, AveragePool,
  MaxPool, GlobalAveragePool, Concat (channel axis 1), Add of two computed tensors (a residual
  connection); Identity and Constant vanish;
* Shape, Gather, Unsqueeze and Concat on sizes, as torch exports ``x.view(x.size(0), -1)``:
  only to compute the target shape of a Reshape, whose first entry may be the batch size.

Any other op is an ``OnnxImportError`` naming the op type and the node. The ONNX input may take
images (N, C, H, W) or flat vectors (N, C*H*W) of the data's image shape; the rebuilt module
always takes images (it flattens them first for a flat input). ``import_onnx`` then compares
its logits with onnxruntime's on random inputs and refuses a difference above ``tolerance``
(relative to the largest logit, at least 1).
"""
from __future__ import annotations

import math
import operator
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from .ops import AvgPoolOp, MaxPoolOp, pool_op

SUPPORTED_OPS = ("Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv", "Div", "Flatten", "Gather",
                 "Gemm", "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Relu", "Reshape", "Shape", "Sub",
                 "Unsqueeze")


class OnnxImportError(ValueError):
    """An ONNX file ctbench cannot rebuild, or whose rebuilt logits differ from onnxruntime's."""


@dataclass(frozen=True)
class ImportedOnnx:
    """model: the rebuilt network (eval mode, float32), taking images (N, C, H, W);
    onnx_input_shape: the ONNX input's shape (None for a symbolic dim); max_abs_difference:
    between its logits and onnxruntime's on ``checked_inputs`` random inputs (None: not checked)."""

    model: fx.GraphModule
    onnx_input_shape: tuple[int | None, ...]
    max_abs_difference: float | None
    checked_inputs: int


def import_onnx(path: str | Path, image_shape: Sequence[int], *, check: bool = True, tolerance: float = 1e-4,
                check_inputs: int = 8) -> ImportedOnnx:
    """Rebuild the ONNX network at ``path`` for images of ``image_shape`` (C, H, W) (module
    docstring); with ``check``, compare it with onnxruntime (a warning, and no check, when
    onnxruntime is not installed)."""
    path = Path(path)
    graph = _load(path).graph
    image_shape = tuple(int(size) for size in image_shape)
    input_name, input_shape = _graph_input(graph, image_shape)
    model = _Builder(graph, input_name, input_shape, image_shape).build()
    difference = None
    if check:
        difference = compare_with_onnxruntime(model, path, input_shape, image_shape, tolerance, check_inputs)
    return ImportedOnnx(model, input_shape, difference, check_inputs if difference is not None else 0)


def compare_with_onnxruntime(model: nn.Module, path: Path, input_shape: tuple[int | None, ...],
                             image_shape: tuple[int, ...], tolerance: float, count: int) -> float | None:
    """The largest absolute difference between ``model``'s logits and onnxruntime's on ``count``
    uniform random images in [0, 1] (seeded); above ``tolerance`` x max(1, max |logit|) it is an
    ``OnnxImportError``. None, with a warning, when onnxruntime is missing."""
    try:
        import onnxruntime
    except ImportError:
        warnings.warn(f"onnxruntime is not installed, so the network imported from {path} is not checked against "
                      "it; install it with pip install 'ctbench[certify]'", stacklevel=2)
        return None
    batch = input_shape[0] or count  # a network of a static batch size is fed batches of that size
    count = -(-count // batch) * batch
    images = torch.rand((count, *image_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(images).double().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    dtype = np.float64 if feed.type == "tensor(double)" else np.float32
    onnx_inputs = (images.flatten(1) if len(input_shape) == 2 else images).numpy().astype(dtype)
    theirs = np.concatenate([session.run(None, {feed.name: onnx_inputs[start:start + batch]})[0]
                             for start in range(0, count, batch)]).astype(np.float64)
    if theirs.shape != ours.shape:
        raise OnnxImportError(f"{path}: onnxruntime gives logits of shape {theirs.shape}, the imported network "
                              f"{ours.shape}")
    difference = float(np.abs(theirs - ours).max())
    allowed = tolerance * max(1.0, float(np.abs(theirs).max()))
    if not difference <= allowed:
        raise OnnxImportError(f"{path}: the imported network's logits differ from onnxruntime's by up to "
                              f"{difference:.3g} on {count} random inputs (allowed: {allowed:.3g}); the import "
                              "does not compute what the file does")
    return difference


# ----------------------------------------------------------------------------------------------
# Reading the file


def _load(path: Path):
    try:
        import onnx
    except ImportError:
        raise OnnxImportError("importing an ONNX network needs the onnx package; install it with pip install "
                              "'ctbench[certify]'") from None
    if not path.is_file():
        raise OnnxImportError(f"no ONNX file at {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises several types for unreadable or malformed files
        raise OnnxImportError(f"{path} is not a valid ONNX model ({type(error).__name__}: {error})") from None
    return model


def _dims(value_info) -> tuple[int | None, ...]:
    """A graph input's or output's shape, None for a symbolic or unknown dim."""
    return tuple(dim.dim_value if dim.HasField("dim_value") else None
                 for dim in value_info.type.tensor_type.shape.dim)


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if index == 0 else ("?" if size is None else str(size))
                           for index, size in enumerate(shape)) + ")"


def _graph_input(graph, image_shape: tuple[int, ...]) -> tuple[str, tuple[int | None, ...]]:
    """The one input the network computes from, checked against the data's image shape: images
    (N, C, H, W) or flat vectors (N, C*H*W)."""
    from onnx import TensorProto

    weights = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]  # old files list weights as inputs
    if len(inputs) != 1:
        raise OnnxImportError(f"ctbench networks take one input tensor; this ONNX graph has {len(inputs)}: "
                              f"{[value.name for value in inputs]}")
    value = inputs[0]
    if value.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        raise OnnxImportError(f"the ONNX input {value.name!r} is not a float tensor")
    shape = _dims(value)
    flat = (math.prod(image_shape),)
    if not any(len(shape) == 1 + len(wanted) and all(size in (None, want) for size, want in zip(shape[1:], wanted))
               for wanted in (image_shape, flat)):
        raise OnnxImportError(f"the ONNX input {value.name!r} has shape {_show(shape)} but the data's images are "
                              f"{_show((None, *image_shape))} (or flat {_show((None, *flat))})")
    return value.name, shape


def _array(tensor_proto) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor_proto)


def _attributes(node) -> dict:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _describe(node, index: int) -> str:
    return f"node {node.name or f'#{index}'!r} ({node.op_type})"


# ----------------------------------------------------------------------------------------------
# Rebuilding the graph


@dataclass
class _Computed:
    """A tensor the network computes: the fx node that computes it, its value on a one-image
    probe (for shapes), and the Linear or Conv module whose output it is (for bias folding)."""

    node: fx.Node
    probe: Tensor
    producer: nn.Module | None = None


_BATCH = "N"  # the batch size among sizes read from a shape


@dataclass(frozen=True)
class _Sizes:
    """Sizes read from a computed tensor's shape (Shape, Gather, Unsqueeze, Concat): ints and
    _BATCH; ``scalar`` for one entry read with a scalar index (a 0-d tensor in ONNX)."""

    entries: tuple[int | str, ...]
    scalar: bool = False


class _Builder:
    """Rebuilds an ONNX graph node by node (``_op_<op type>``) as an fx graph; each ONNX value
    is a constant (a numpy array), a computed tensor (_Computed) or sizes (_Sizes)."""

    def __init__(self, graph, input_name: str, input_shape: tuple[int | None, ...],
                 image_shape: tuple[int, ...]) -> None:
        self.onnx_graph = graph
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.static_batch = input_shape[0]
        self.values: dict[str, np.ndarray | _Computed | _Sizes] = {
            initializer.name: _array(initializer) for initializer in graph.initializer}
        self.readers = Counter(name for node in graph.node for name in node.input if name)
        self.readers.update(output.name for output in graph.output)
        images = self.graph.placeholder("images")
        probe = torch.zeros(1, *image_shape)
        if len(input_shape) == 2:  # the ONNX network takes flat vectors
            self.values[input_name] = self.call(torch.flatten, (_Computed(images, probe),), {"start_dim": 1})
        else:
            self.values[input_name] = _Computed(images, probe)

    def build(self) -> fx.GraphModule:
        for index, node in enumerate(self.onnx_graph.node):
            where = _describe(node, index)
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
                domain = f" of domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
                raise OnnxImportError(f"{where}: the op type {node.op_type}{domain} is not supported; supported: "
                                      f"{', '.join(SUPPORTED_OPS)}")
            inputs = [self.value(name, where) if name else None for name in node.input]
            try:
                with torch.no_grad():
                    result = getattr(self, f"_op_{node.op_type}")(node, where, inputs, _attributes(node))
            except OnnxImportError:
                raise
            except (ValueError, RuntimeError) as error:  # from numpy or torch, on the node's shapes
                raise OnnxImportError(f"{where}: {error}") from None
            self.values[node.output[0]] = result
            if any(self.readers[name] for name in node.output[1:]):
                raise OnnxImportError(f"{where}: only its first output may be read")
        return self.finish()

    def finish(self) -> fx.GraphModule:
        outputs = self.onnx_graph.output
        if len(outputs) != 1:
            raise OnnxImportError(f"ctbench networks have one output (the logits); this ONNX graph has "
                                  f"{len(outputs)}: {[output.name for output in outputs]}")
        logits = self.value(outputs[0].name, "the graph output")
        if not isinstance(logits, _Computed) or logits.probe.dim() != 2:
            raise OnnxImportError(f"the ONNX output {outputs[0].name!r} must be logits (N, classes) computed from the "
                                  "input")
        self.graph.output(logits.node)
        return fx.GraphModule(self.root, self.graph, class_name="OnnxNetwork").eval()

    # --- values and calls

    def value(self, name: str, where: str) -> np.ndarray | _Computed | _Sizes:
        if name not in self.values:
            raise OnnxImportError(f"{where} reads {name!r}, which no earlier node computes")
        return self.values[name]

    def call(self, function, args: tuple, kwargs: dict | None = None) -> _Computed:
        """``function(*args, **kwargs)`` in the graph (and on the probes); a _Computed argument
        stands for its tensor, a list of them for the list of tensors."""
        kwargs = kwargs or {}
        nodes = fx.node.map_aggregate((args, kwargs), lambda v: v.node if isinstance(v, _Computed) else v)
        probes = fx.node.map_aggregate((args, kwargs), lambda v: v.probe if isinstance(v, _Computed) else v)
        return _Computed(self.graph.call_function(function, *nodes), function(*probes[0], **probes[1]))

    def call_module(self, onnx_node, module: nn.Module, source: _Computed) -> _Computed:
        """``module`` applied to ``source``, as a submodule named after the ONNX node."""
        name = self.module_name(onnx_node)
        self.root.add_module(name, module)
        producer = module if isinstance(module, (nn.Linear, nn.Conv2d)) else None
        return _Computed(self.graph.call_module(name, (source.node,)), module.eval()(source.probe), producer)

    def module_name(self, onnx_node) -> str:
        """A Python identifier from the ONNX node's name ("/conv1/Conv" -> "conv1_Conv"), unique
        and clear of nn.Module's attributes."""
        base = re.sub(r"\W+", "_", onnx_node.name).strip("_")
        if not base or base[0].isdigit():
            base = f"{onnx_node.op_type.lower()}_{base}".rstrip("_")
        name, suffix = base, 1
        while hasattr(self.root, name):
            suffix += 1
            name = f"{base}_{suffix}"
        return name

    # --- argument checks

    @staticmethod
    def computed(value, where: str, what: str = "its input") -> _Computed:
        if not isinstance(value, _Computed):
            raise OnnxImportError(f"{where}: {what} must be computed from the network input, not a constant "
                                  "(fold constant subgraphs first, e.g. with onnxsim)")
        return value

    @staticmethod
    def constant(value, where: str, what: str) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise OnnxImportError(f"{where}: {what} must be a constant (an initializer or a Constant node)")
        return value

    @staticmethod
    def rank(value: _Computed, ranks: tuple[int, ...], where: str) -> int:
        if value.probe.dim() not in ranks:
            raise OnnxImportError(f"{where}: its input has shape {_show(value.probe.shape)}; supported: rank "
                                  f"{' or '.join(map(str, ranks))}")
        return value.probe.dim()

    # --- ops: each returns the value of the node's first output

    def _op_Identity(self, node, where, inputs, attributes):
        return _renamed(inputs[0])

    def _op_Constant(self, node, where, inputs, attributes):
        (name, value), = attributes.items()
        if name == "sparse_value" or name.endswith("string") or name.endswith("strings"):
            raise OnnxImportError(f"{where}: only numeric dense constants are supported, not {name}")
        return _array(value) if name == "value" else np.asarray(value)

    def _op_Relu(self, node, where, inputs, attributes):
        return self.call(torch.relu, (self.computed(inputs[0], where),))

    def _op_Gemm(self, node, where, inputs, attributes):
        if attributes.get("transA", 0):
            raise OnnxImportError(f"{where}: only transA = 0 (the input times the weights) is supported")
        source = self.computed(inputs[0], where, "its input A")
        self.rank(source, (2,), where)
        matrix = self.constant(inputs[1], where, "its weights B").astype(np.float64)
        weight = attributes.get("alpha", 1.0) * (matrix if attributes.get("transB", 0) else matrix.T)
        bias = None
        if len(inputs) > 2 and inputs[2] is not None:
            offset = self.constant(inputs[2], where, "its bias C")
            bias = attributes.get("beta", 1.0) * np.broadcast_to(offset, (1, weight.shape[0]))[0]
        return self.call_module(node, _linear(weight, bias), source)

    def _op_MatMul(self, node, where, inputs, attributes):
        source = self.computed(inputs[0], where, "its first input")
        self.rank(source, (2,), where)
        matrix = self.constant(inputs[1], where, "its second input (the weights)")
        if matrix.ndim != 2:
            raise OnnxImportError(f"{where}: the weights must be a matrix, got shape {matrix.shape}")
        return self.call_module(node, _linear(matrix.T, None), source)

    def _op_Conv(self, node, where, inputs, attributes):
        source = self.computed(inputs[0], where)
        self.rank(source, (4,), where)
        weight = self.constant(inputs[1], where, "its weights")
        bias = self.constant(inputs[2], where, "its bias") if len(inputs) > 2 and inputs[2] is not None else None
        if attributes.get("group", 1) != 1 or any(d != 1 for d in attributes.get("dilations", [1, 1])):
            raise OnnxImportError(f"{where}: only group = 1 and dilation 1 are supported")
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                         stride=tuple(attributes.get("strides", [1, 1])), padding=_padding(attributes, where),
                         bias=bias is not None)
        _set(conv.weight, weight)
        if bias is not None:
            _set(conv.bias, bias)
        return self.call_module(node, conv, source)

    def _op_BatchNormalization(self, node, where, inputs, attributes):
        source = self.computed(inputs[0], where)
        rank = self.rank(source, (2, 3, 4), where)
        if attributes.get("training_mode", 0):
            raise OnnxImportError(f"{where}: only inference (training_mode = 0) is supported")
        scale, shift, mean, variance = (self.constant(value, where, what) for value, what in
                                        zip(inputs[1:5], ("its scale", "its bias", "its mean", "its variance")))
        norm = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(len(scale), eps=attributes.get("epsilon", 1e-5))
        for tensor, array in ((norm.weight, scale), (norm.bias, shift), (norm.running_mean, mean),
                              (norm.running_var, variance)):
            _set(tensor, array)
        return self.call_module(node, norm, source)

    def _op_Add(self, node, where, inputs, attributes):
        first, second = inputs
        if isinstance(first, _Computed) and isinstance(second, _Computed):
            if first.probe.shape != second.probe.shape:
                raise OnnxImportError(f"{where}: adds tensors of shapes {tuple(first.probe.shape[1:])} and "
                                      f"{tuple(second.probe.shape[1:])} per sample; only equal shapes are supported")
            return self.call(operator.add, (first, second))
        return self._constant_affine(node, where, inputs, attributes)

    def _constant_affine(self, node, where, inputs, attributes) -> _Computed:
        """x + c, x - c, c - x, x * c, c * x, x / c with c the same over each channel: an Add or
        Sub into the bias of a Linear or Conv read by nothing else, else a per-channel affine map."""
        constant_first = isinstance(inputs[0], np.ndarray)
        source = self.computed(inputs[1] if constant_first else inputs[0], where, "one of its inputs")
        self.rank(source, (2, 3, 4), where)
        constant = _per_channel(self.constant(inputs[0] if constant_first else inputs[1], where, "one of its inputs"),
                                source.probe.shape, where)
        ones, zeros = np.ones_like(constant), np.zeros_like(constant)
        if node.op_type == "Div" and constant_first:
            raise OnnxImportError(f"{where}: c / x is not an affine map; only x / c is supported")
        scale, shift = {"Add": (ones, constant), "Mul": (constant, zeros), "Div": (1.0 / constant, zeros),
                        "Sub": (-ones, constant) if constant_first else (ones, -constant)}[node.op_type]
        producer = source.producer
        if (scale == 1).all() and producer is not None and self.readers[node.input[1 if constant_first else 0]] == 1:
            offset = torch.tensor(shift, dtype=torch.float32)
            producer.bias = nn.Parameter(offset if producer.bias is None else producer.bias.detach() + offset)
            view = offset.view(1, -1, *([1] * (source.probe.dim() - 2)))
            return _Computed(source.node, source.probe + view, producer)
        norm = (nn.BatchNorm2d if source.probe.dim() == 4 else nn.BatchNorm1d)(len(constant), eps=0.0)
        _set(norm.weight, scale)  # mean 0, variance 1 and eps 0: BatchNorm computes x * weight + bias
        _set(norm.bias, shift)
        return self.call_module(node, norm, source)

    _op_Sub = _op_Mul = _op_Div = _constant_affine

    def _op_Flatten(self, node, where, inputs, attributes):
        source = self.computed(inputs[0], where)
        if attributes.get("axis", 1) % source.probe.dim() != 1:
            raise OnnxImportError(f"{where}: only axis = 1 (flattening each sample) is supported")
        return self.call(torch.flatten, (source,), {"start_dim": 1})

    def _op_Reshape(self, node, where, inputs, attributes):
        source = self.computed(inputs[0], where)
        if isinstance(inputs[1], _Sizes):
            if _BATCH in inputs[1].entries[1:]:
                raise OnnxImportError(f"{where}: the batch size may only be the first entry of the target shape")
            target = [0 if size == _BATCH else size for size in inputs[1].entries]  # 0: keep the input's size
        else:
            target = [int(size) for size in self.constant(inputs[1], where, "the target shape").reshape(-1)]
        batch_kept = target and (target[0] == 0 or target[0] == self.static_batch
                                 or (target[0] == -1 and -1 not in target[1:]))
        if (attributes.get("allowzero", 0) and 0 in target) or not batch_kept:
            raise OnnxImportError(f"{where}: the target shape {target} must keep the batch dim first (0, -1 or the "
                                  "input's batch size there)")
        per_sample = source.probe.shape[1:]
        sizes = [per_sample[index] if size == 0 and index < len(per_sample) else size
                 for index, size in enumerate(target[1:])]  # 0 copies the input's size (ONNX)
        shape = tuple(source.probe[0].reshape(sizes).shape)  # resolves a -1; a wrong size is a RuntimeError
        if len(shape) == 1:
            return self.call(torch.flatten, (source,), {"start_dim": 1})
        batch = self.graph.call_method("size", (source.node, 0))
        node_reshaped = self.graph.call_method("reshape", (source.node, batch, *shape))
        return _Computed(node_reshaped, source.probe.reshape(source.probe.shape[0], *shape))

    def _op_AveragePool(self, node, where, inputs, attributes):
        return self._pool(node, where, inputs, attributes, AvgPoolOp)

    def _op_MaxPool(self, node, where, inputs, attributes):
        if attributes.get("dilations", [1, 1]) != [1, 1]:
            raise OnnxImportError(f"{where}: only dilation 1 is supported")
        return self._pool(node, where, inputs, attributes, MaxPoolOp)

    def _pool(self, node, where, inputs, attributes, kind) -> _Computed:
        source = self.computed(inputs[0], where)
        self.rank(source, (4,), where)
        kernel = tuple(attributes["kernel_shape"])
        stride = tuple(attributes.get("strides", [1, 1]))  # ONNX's default stride is 1, torch's the kernel
        padding = _padding(attributes, where)
        ceil_mode = bool(attributes.get("ceil_mode", 0))
        # ONNX's AveragePool leaves the padding out of the mean by default; MaxPool has no such choice
        count_include_pad = bool(attributes.get("count_include_pad", 0)) if kind is AvgPoolOp else True
        try:
            pool_op(kind, where, kernel, stride, padding, ceil_mode, count_include_pad=count_include_pad)
        except ValueError as error:  # names the node already
            raise OnnxImportError(str(error)) from None
        if kind is AvgPoolOp:
            module = nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad)
        else:
            module = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
        return self.call_module(node, module, source)

    def _op_GlobalAveragePool(self, node, where, inputs, attributes):
        source = self.computed(inputs[0], where)
        self.rank(source, (4,), where)
        return self.call_module(node, nn.AvgPool2d(tuple(source.probe.shape[2:])), source)

    def _op_Concat(self, node, where, inputs, attributes):
        if any(isinstance(value, _Sizes) for value in inputs):
            return self._concat_sizes(where, inputs)
        sources = [self.computed(value, where, "each of its inputs") for value in inputs]
        if attributes["axis"] % sources[0].probe.dim() != 1:
            raise OnnxImportError(f"{where}: only concatenation along the channel axis 1 is supported")
        return _renamed(sources[0]) if len(sources) == 1 else self.call(torch.cat, (sources,), {"dim": 1})

    # --- sizes: the batch size of a Reshape

    def _op_Shape(self, node, where, inputs, attributes):
        sizes = (_BATCH, *self.computed(inputs[0], where).probe.shape[1:])
        return _Sizes(sizes[attributes.get("start", 0):attributes.get("end")])

    def _op_Gather(self, node, where, inputs, attributes):
        if not isinstance(inputs[0], _Sizes) or attributes.get("axis", 0) != 0:
            raise OnnxImportError(f"{where}: Gather is supported only on a shape (Shape's output), to read sizes")
        indices = self.constant(inputs[1], where, "its indices")
        return _Sizes(tuple(inputs[0].entries[int(i)] for i in indices.reshape(-1)), scalar=indices.ndim == 0)

    def _op_Unsqueeze(self, node, where, inputs, attributes):
        if not (isinstance(inputs[0], _Sizes) and inputs[0].scalar):
            raise OnnxImportError(f"{where}: Unsqueeze is supported only on one size read from a shape")
        return _Sizes(inputs[0].entries)

    def _concat_sizes(self, where, inputs) -> _Sizes:
        entries: list[int | str] = []
        for value in inputs:
            if isinstance(value, _Sizes) and value.scalar:
                raise OnnxImportError(f"{where}: concatenates a scalar size; Unsqueeze it first")
            entries += (value.entries if isinstance(value, _Sizes)
                        else [int(size) for size in self.constant(value, where, "each of its inputs").reshape(-1)])
        return _Sizes(tuple(entries))


def _renamed(value):
    """A value under another name (Identity, a Concat of one input). A computed tensor loses its
    producer: readers are counted by name, so a bias folded through the new name could change
    what readers of the old one see."""
    return _Computed(value.node, value.probe) if isinstance(value, _Computed) else value


def _set(tensor: Tensor, array: np.ndarray) -> None:
    """Copy an ONNX array into a parameter or buffer of the same number of entries."""
    values = torch.tensor(np.asarray(array, dtype=np.float32))
    if values.numel() != tensor.numel():
        raise OnnxImportError(f"a weight has shape {tuple(values.shape)}, expected {tuple(tensor.shape)}")
    tensor.data.copy_(values.reshape(tensor.shape))


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    """nn.Linear with ``weight`` (out, in)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    _set(linear.weight, weight)
    if bias is not None:
        _set(linear.bias, bias)
    return linear


def _padding(attributes: dict, where: str) -> tuple[int, int]:
    """(top, left) of ONNX pads [top, left, bottom, right], which must be symmetric."""
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise OnnxImportError(f"{where}: auto_pad {auto_pad} is not supported; export with explicit pads")
    pads = attributes.get("pads", [0, 0, 0, 0]) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    if len(pads) != 4 or pads[:2] != pads[2:]:
        raise OnnxImportError(f"{where}: only symmetric 2-d padding is supported, got pads {pads}")
    return pads[0], pads[1]


def _per_channel(constant: np.ndarray, shape: torch.Size, where: str) -> np.ndarray:
    """The constant as one value per channel (dim 1) of a tensor of ``shape`` (batch 1), if it
    is the same over every other dim."""
    try:
        full = np.broadcast_to(constant.astype(np.float64), tuple(shape))
    except ValueError:
        raise OnnxImportError(f"{where}: its constant of shape {constant.shape} does not broadcast to the tensor's "
                              f"shape {_show((None, *shape[1:]))}") from None
    channels = full.reshape(shape[0], shape[1], -1)[0, :, 0]
    if not (full == channels.reshape(1, -1, *([1] * (len(shape) - 2)))).all():
        raise OnnxImportError(f"{where}: its constant of shape {constant.shape} varies within a channel; only "
                              "constants per channel (dim 1) are supported")
    return channels
