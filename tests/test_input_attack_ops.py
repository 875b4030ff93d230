"""The chain that training's input attacks run: the same logits and input gradients as the
lowered network, with its Flatten of channels-last activations a view and its strided
convolutions on few channels run over the input's phases."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ctbench.attacks.input_ops import (ChannelsLastFlattenOp, PhaseConvOp, as_phase_conv, input_attack_ops,
                                       phase_space_conv)
from ctbench.methods import StepInputs
from ctbench.models import InputSpec, build_model, initialize
from ctbench.models.ops import ConvOp, clean_forward, lower_network, run_ops


def _values_and_input_gradients(op, x, seed):
    x = x.clone().requires_grad_()
    y = op(x)
    return y, torch.autograd.grad(y, x, seed)[0]


@pytest.mark.parametrize("channels, size, kernel, stride, padding", [
    (1, 28, 5, 2, 2),   # CNN3's first convolution on MNIST
    (3, 32, 5, 2, 2),   # and on CIFAR-10
    (2, 12, 4, 2, 1), (1, 12, 3, 2, 1), (3, 9, 3, 3, 0), (1, 12, 6, 3, 2), (2, 8, 2, 2, 0),
    (1, 12, 3, 3, 1)])  # the last pads the phases on one side only
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_phase_convolution_equals_the_strided_convolution(channels, size, kernel, stride, padding, memory_format):
    generator = torch.Generator().manual_seed(size * kernel + stride)
    op = ConvOp(torch.randn(5, channels, kernel, kernel, generator=generator, dtype=torch.float64),
                torch.randn(5, generator=generator, dtype=torch.float64), (stride, stride), (padding, padding))
    x = torch.randn(3, channels, size, size, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    phase_op = as_phase_conv(op, x.shape)
    assert isinstance(phase_op, PhaseConvOp)
    expected, expected_gradient = _values_and_input_gradients(op, x, seed := torch.randn(op(x).shape, generator=generator,
                                                                                          dtype=torch.float64))
    value, gradient = _values_and_input_gradients(phase_op, x, seed)
    assert value.shape == expected.shape
    assert torch.allclose(value, expected, rtol=0, atol=1e-12)
    assert torch.allclose(gradient, expected_gradient, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels, size, kernel, stride, padding", [
    (16, 14, 4, 2, 1),  # CNN3's TAPS head on MNIST
    (2, 12, 4, 2, 1), (1, 12, 3, 2, 1), (3, 9, 3, 3, 0), (1, 12, 6, 3, 2), (2, 8, 2, 2, 0), (1, 12, 3, 3, 1)])
def test_phase_space_convolution_on_the_phases_equals_the_strided_convolution(channels, size, kernel, stride, padding):
    """What TAPS's latent attack runs: the convolution of the phases themselves, a plain stride-1
    ConvOp, where the phases need the same padding on both sides; None where they do not."""
    generator = torch.Generator().manual_seed(size * kernel + stride)
    op = ConvOp(torch.randn(5, channels, kernel, kernel, generator=generator, dtype=torch.float64),
                torch.randn(5, generator=generator, dtype=torch.float64), (stride, stride), (padding, padding))
    x = torch.randn(3, channels, size, size, generator=generator, dtype=torch.float64)
    phase_op = phase_space_conv(op, x.shape)
    left, right, top, bottom = as_phase_conv(op, x.shape).padding
    if (left, top) != (right, bottom):
        assert phase_op is None
        return
    assert isinstance(phase_op, ConvOp) and phase_op.stride == (1, 1)
    phases = F.pixel_unshuffle(x, stride)
    seed = torch.randn(op(x).shape, generator=generator, dtype=torch.float64)
    expected, expected_gradient = _values_and_input_gradients(op, x, seed)
    value, gradient = _values_and_input_gradients(phase_op, phases, seed)
    assert torch.allclose(value, expected, rtol=0, atol=1e-12)
    assert torch.allclose(F.pixel_shuffle(gradient, stride), expected_gradient, rtol=0, atol=1e-12)
    assert phase_space_conv(dataclasses.replace(op, stride=(1, 1)), x.shape) is None  # stride 1: nothing to rearrange


@pytest.mark.parametrize("size, kernel, stride, padding, strides", [
    (13, 5, 2, 2, None),      # the stride does not divide the input
    (28, 3, 2, 0, None),      # 13 outputs, not 28 / 2
    (12, 3, 1, 1, None),      # stride 1: nothing to gain
    (12, 4, 2, 1, (2, 1))])   # unequal strides
def test_phase_convolution_is_refused_where_it_would_change_the_output(size, kernel, stride, padding, strides):
    op = ConvOp(torch.randn(4, 1, kernel, kernel), None, strides or (stride, stride), (padding, padding))
    assert as_phase_conv(op, torch.Size((2, 1, size, size))) is None


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_step_input_attack_runs_the_rewritten_chain_with_the_same_logits_and_gradients(memory_format):
    """CNN3 with BatchNorm, lowered as the trainer lowers it: its first convolution (stride 2, one
    channel) runs over the phases, its Flatten of channels-last activations as a view."""
    torch.manual_seed(0)
    model = build_model("cnn3", InputSpec(1, 12, 4, (0.1,), (0.9,)), True).double().to(memory_format=memory_format)
    initialize(model, "ibp")
    generator = torch.Generator().manual_seed(1)
    x = torch.rand((5, 1, 12, 12), generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 4, (5,), generator=generator)
    logits, stats = clean_forward(model, x)
    step = StepInputs(model, x, labels, 0.1, 0.1, lower_network(model, stats, fold=True),
                      lower_network(model, stats.detached(), detach=True, fold=True), logits, stats, 4)
    kinds = [type(op) for op in step._input_attack_ops]
    assert PhaseConvOp in kinds and (ChannelsLastFlattenOp in kinds) == (memory_format == torch.channels_last)
    seed = torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    value, gradient = _values_and_input_gradients(step.attack_logits, x, seed)
    expected, expected_gradient = _values_and_input_gradients(lambda z: run_ops(step.attack_ops, z), x, seed)
    assert torch.allclose(value, expected, rtol=0, atol=1e-12)
    assert torch.allclose(gradient, expected_gradient, rtol=0, atol=1e-12)


def test_a_chain_without_strided_few_channel_convolutions_is_left_as_it_is():
    ops = lower_network(torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                                            torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).double())
    assert input_attack_ops(ops, torch.zeros(2, 8, 12, 12, dtype=torch.float64)) == tuple(ops)
