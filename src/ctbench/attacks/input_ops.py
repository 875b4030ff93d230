"""The lowered chain as attacks run it: the same function, rewritten for speed on a CPU.

* A Flatten of channels-last activations becomes a view (``flatten_in_memory_order``), so the
  backward hands the ReLU and convolution before it a gradient in their own memory format.
* A strided convolution on few input channels (CNN3's first: 1 channel on MNIST, 3 on
  CIFAR-10) becomes a stride-1 convolution over the input's s x s phases (``pixel_unshuffle``):
  oneDNN's kernels for 1-3 input channels are slow, its input gradient above all (CNN3 on
  MNIST, 768 rows: forward and input gradient 89 -> 29 ms in float32, 33 -> 17 ms in bfloat16).
* TAPS's latent attack, whose head starts with a strided convolution (CNN3's and CNN5's heads),
  iterates the phases themselves (``phase_space_conv``): the box is rearranged once, and each
  step runs a stride-1 convolution on them and its input gradient (CNN3's head, 2304 rows, one
  thread: 43 -> 13 ms in bfloat16, 81 -> 68 ms in float32).

Training's input attacks (``StepInputs.attack_logits``) and the latent attack run these ops;
bounds and the certification's attacks use the lowered network itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bounds.box import box_memory_format
from ..models.ops import ConvOp, FlattenOp, LinearOp, Op

@dataclass(frozen=True, eq=False)
class ChannelsLastFlattenOp:
    """Flatten a channels-last activation in its memory order (height, width, channel): a view,
    where FlattenOp copies; the linear op after it takes its weight columns in that order."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def flatten_in_memory_order(ops: tuple[Op, ...], example: Tensor) -> tuple[Op, ...]:
    """The ops with each Flatten of a channels-last activation (as ``example``, a few input
    rows, shows it) that feeds a Linear replaced by ChannelsLastFlattenOp, and that Linear's
    weight columns permuted to match: the same function, without a copy forward or backward
    (under autograd the permutation is differentiable)."""
    ops, x = list(ops), example.detach()
    for index, op in enumerate(ops[:-1]):
        following = ops[index + 1]
        channels_last = box_memory_format(x) == torch.channels_last
        if isinstance(op, FlattenOp) and isinstance(following, LinearOp) and channels_last:
            outputs, (channels, height, width) = following.weight.shape[0], x.shape[1:]
            weight = following.weight.view(outputs, channels, height, width).permute(0, 2, 3, 1).reshape(outputs, -1)
            ops[index], ops[index + 1] = ChannelsLastFlattenOp(), dataclasses.replace(following, weight=weight)
        with torch.no_grad():
            x = ops[index](x)
    return tuple(ops)



# Input channels up to which a strided convolution runs as a convolution over its phases.
PHASE_CHANNELS = 4


@dataclass(frozen=True, eq=False)
class PhaseConvOp:
    """A convolution of stride s as a stride-1 convolution over the s x s phases of its input:
    channel c s^2 + i s + j of the phases holds x[c, s y + i, s x + j] (``pixel_unshuffle``)."""

    weight: Tensor  # (out, in s^2, kh', kw')
    bias: Tensor | None
    stride: int
    padding: tuple[int, int, int, int]  # of the phases, in F.pad's order: left, right, top, bottom

    def __call__(self, x: Tensor) -> Tensor:
        phases = F.pixel_unshuffle(x, self.stride).contiguous(memory_format=box_memory_format(x))
        left, right, top, bottom = self.padding
        if left == right and top == bottom:
            return F.conv2d(phases, self.weight, self.bias, padding=(top, left))
        return F.conv2d(F.pad(phases, self.padding), self.weight, self.bias)


def as_phase_conv(op: ConvOp, input_shape: torch.Size) -> PhaseConvOp | None:
    """The op as a PhaseConvOp for inputs of ``input_shape``, or None where that does not give
    the same output: unequal strides, stride 1, or an input size that the stride does not
    divide into the op's output size."""
    stride = op.stride[0]
    height, width = input_shape[-2:]
    out_channels, channels, kernel_height, kernel_width = op.weight.shape
    if stride == 1 or op.stride[1] != stride or height % stride or width % stride:
        return None
    output = [(size + 2 * pad - kernel) // stride + 1
              for size, pad, kernel in ((height, op.padding[0], kernel_height), (width, op.padding[1], kernel_width))]
    if output != [height // stride, width // stride]:
        return None
    # kernel tap k reads x[s i + k - p] = phase (k - p) mod s at i + (k - p) // s
    first = [(-pad) // stride for pad in op.padding]
    last = [(kernel - 1 - pad) // stride for pad, kernel in zip(op.padding, (kernel_height, kernel_width))]
    weight = op.weight.new_zeros(out_channels, channels * stride * stride, last[0] - first[0] + 1, last[1] - first[1] + 1)
    phase_channels = torch.arange(channels, device=op.weight.device) * stride * stride
    for row in range(kernel_height):
        row_offset, row_phase = divmod(row - op.padding[0], stride)
        for column in range(kernel_width):
            column_offset, column_phase = divmod(column - op.padding[1], stride)
            weight[:, phase_channels + row_phase * stride + column_phase,
                   row_offset - first[0], column_offset - first[1]] = op.weight[:, :, row, column]
    if op.weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    return PhaseConvOp(weight, op.bias, stride, (-first[1], last[1], -first[0], last[0]))


def phase_space_conv(op: Op, input_shape: torch.Size) -> ConvOp | None:
    """A strided convolution as the stride-1 convolution of its input's phases, for an attack
    whose iterates are the phases (``F.pixel_unshuffle`` of the points, stride ``op.stride``);
    None where ``as_phase_conv`` gives None or would pad the phases unevenly."""
    phase = as_phase_conv(op, input_shape) if isinstance(op, ConvOp) else None
    if phase is None:
        return None
    left, right, top, bottom = phase.padding
    if left != right or top != bottom:
        return None
    return ConvOp(phase.weight, phase.bias, (1, 1), (top, left))


def input_attack_ops(ops: tuple[Op, ...], example: Tensor) -> tuple[Op, ...]:
    """The chain for attacks on its input (``example``: a few input rows, to see the shapes and
    memory formats of the activations). Phases only on a CPU, where they were measured."""
    ops, x = list(flatten_in_memory_order(ops, example)), example.detach()
    for index, op in enumerate(ops):
        if isinstance(op, ConvOp) and op.weight.shape[1] <= PHASE_CHANNELS and x.device.type == "cpu":
            ops[index] = as_phase_conv(op, x.shape) or op
        with torch.no_grad():
            x = op(x)
    return tuple(ops)
