"""Model utilization (paper section 5.3): the ratio of neurons active on the clean input.

A *neuron* is one element of a ReLU input (a pre-activation); it is *active* when the
pre-activation is > 0. The network is lowered with the model's population BatchNorm
statistics (``lower_network(model)``), as at test time.

This module also holds the small helpers every neuron-level analysis shares: turning a model
or its ops into ops, images into floats, and recording the pre-activation of every ReLU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..bounds.crown import relu_indices
from ..models.ops import (
    ChannelAffineOp, ConvOp, FlattenOp, Graph, LinearOp, Network, Op, ReluOp, lower_network, network_ops,
    require_chain,
)

ModelOrOps = nn.Module | Sequence[Op] | Graph

# The neuron-level analyses walk a chain of these ops (the paper's CNNs).
ANALYSIS_OPS = (LinearOp, ConvOp, ChannelAffineOp, ReluOp, FlattenOp)


def as_ops(model_or_ops: ModelOrOps) -> Network:
    """Ops of a model (lowered with its population BatchNorm statistics, parameters detached)
    or the given ops unchanged (a chain as a tuple)."""
    if isinstance(model_or_ops, nn.Module):
        return lower_network(model_or_ops, detach=True)
    return model_or_ops if isinstance(model_or_ops, Graph) else tuple(model_or_ops)


def ops_dtype_device(ops: Network) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the first parameter found in ``ops`` (float32/CPU if none)."""
    for op in network_ops(ops):
        if isinstance(op, (LinearOp, ConvOp)):
            return op.weight.dtype, op.weight.device
        if isinstance(op, ChannelAffineOp):
            return op.scale.dtype, op.scale.device
    return torch.float32, torch.device("cpu")


def to_float_images(images: Tensor | np.ndarray, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Tensor:
    """uint8 images (0..255) become floats in [0, 1]; float images are only cast."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        return images.to(device=device, dtype=dtype) / 255.0
    return images.to(device=device, dtype=dtype)


def relu_analysis_inputs(model_or_ops: ModelOrOps, images) -> tuple[tuple[Op, ...], torch.dtype, torch.device, list[int]]:
    """(ops, dtype, device, ReLU op indices) for an analysis of ReLU activations, checking that
    there is a ReLU to analyse and an image to analyse it on."""
    ops = require_chain(as_ops(model_or_ops), ANALYSIS_OPS, "the neuron-level analyses")
    relus = relu_indices(ops)
    if not relus:
        raise ValueError("the network has no ReLU layer")
    if len(images) == 0:
        raise ValueError("no images given")
    return (ops, *ops_dtype_device(ops), relus)


def relu_pre_activations(ops: Sequence[Op], x: Tensor) -> dict[int, Tensor]:
    """The input of every ReLU, keyed by the ReLU's op index (batch dim first)."""
    pre: dict[int, Tensor] = {}
    last = max(relu_indices(ops), default=-1)
    for index, op in enumerate(ops[:last + 1]):
        if isinstance(op, ReluOp):
            pre[index] = x
        x = op(x)
    return pre


def layer_names(ops: Sequence[Op]) -> list[str]:
    """'relu1 (op 3)', ... one name per ReLU layer."""
    return [f"relu{number} (op {index})" for number, index in enumerate(relu_indices(ops), start=1)]


@dataclass(frozen=True)
class UtilizationResult:
    """Average over samples of the ratio of active neurons, per ReLU layer and over all neurons."""

    samples: int
    layer_names: list[str]
    layer_sizes: list[int]
    per_layer: list[float]
    total: float

    def as_dict(self) -> dict:
        return asdict(self)


def active_masks(ops: Sequence[Op], x: Tensor) -> dict[int, Tensor]:
    """Boolean masks (B, *layer shape) of the neurons active (pre-activation > 0) at ``x``."""
    with torch.no_grad():
        return {index: pre > 0 for index, pre in relu_pre_activations(ops, x).items()}


def model_utilization(model_or_ops: ModelOrOps, images: Tensor | np.ndarray, batch_size: int = 256,
                      ) -> UtilizationResult:
    """Ratio of neurons active on each clean input, per ReLU layer and in total (over all
    neurons of the network), averaged over the samples.

    Args:
        model_or_ops: an ``nn.Sequential`` ctbench model (population BatchNorm statistics are
            used) or its lowered ops.
        images: (N, C, H, W), uint8 (0..255) or floats in [0, 1].
        batch_size: samples per forward pass.
    """
    ops, dtype, device, relus = relu_analysis_inputs(model_or_ops, images)
    count = len(images)
    layer_sums = torch.zeros(len(relus), dtype=torch.float64)
    total_sum = 0.0
    sizes: list[int] = []
    for start in range(0, count, batch_size):
        x = to_float_images(images[start:start + batch_size], dtype, device)
        masks = active_masks(ops, x)
        active_counts = [masks[index].flatten(1).sum(1).double().cpu() for index in relus]
        sizes = [masks[index][0].numel() for index in relus]
        for layer, active in enumerate(active_counts):
            layer_sums[layer] += (active / sizes[layer]).sum()
        total_sum += (torch.stack(active_counts).sum(0) / sum(sizes)).sum().item()
    return UtilizationResult(count, layer_names(ops), sizes, (layer_sums / count).tolist(), total_sum / count)
