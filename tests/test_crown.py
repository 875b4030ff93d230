"""Soundness and tightness of CROWN, CROWN-IBP and alpha-CROWN on random small networks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ctbench.bounds import Box, ibp_margin_lower, interval_bounds, linf_box, margin_spec, sample_in_box
from ctbench.bounds.crown import (
    BACKWARD_RULES, BackwardContext, LinearBound, alpha_crown, alpha_crown_bounds, crown_bounds,
    crown_ibp_margin_lower, crown_margin_lower, crown_upper_bounds, intermediate_bounds, relu_indices,
)
from ctbench.models import Normalize
from ctbench.models.ops import ConvOp, LinearOp, ReluOp, lower_network, run_ops

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(max_examples=10, deadline=None, database=None)
SAMPLES = 2000
TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------------
# Random networks, boxes and specs (float64)


def _randomize_batchnorm(layer: nn.modules.batchnorm._BatchNorm, generator: torch.Generator) -> None:
    size = layer.num_features
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(size, generator=generator, dtype=torch.float64) * 0.5)
        layer.running_var.copy_(torch.rand(size, generator=generator, dtype=torch.float64) * 1.5 + 0.5)
        layer.weight.copy_(torch.randn(size, generator=generator, dtype=torch.float64))
        layer.bias.copy_(torch.randn(size, generator=generator, dtype=torch.float64) * 0.5)


def random_network(seed: int, relu: bool = True, trailing_affine: bool | None = None) -> nn.Sequential:
    """Normalize, two convs (the second of stride 2), optional BatchNorms, Flatten, a hidden
    Linear (optional BatchNorm1d), a Linear to K classes and sometimes a trailing BatchNorm1d."""
    generator = torch.Generator().manual_seed(seed)

    def pick(*choices):
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    channels, size, classes = pick(1, 2), pick(6, 7, 8), pick(3, 4)
    batch_norm = pick(True, False)
    layers: list[nn.Module] = [Normalize(tuple(float(v) for v in torch.rand(channels, generator=generator)),
                                         tuple(float(v) for v in torch.rand(channels, generator=generator) + 0.5))]
    c1, k1, s1, p1 = pick(2, 3), pick(2, 3), pick(1, 2), pick(0, 1)
    c2, k2, s2, p2 = pick(2, 4), pick(3, 4), 2, pick(1, 2)
    layers.append(nn.Conv2d(channels, c1, k1, s1, p1))
    if batch_norm:
        layers.append(nn.BatchNorm2d(c1))
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Conv2d(c1, c2, k2, s2, p2))
    if batch_norm:
        layers.append(nn.BatchNorm2d(c2))
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers).double().eval()(torch.zeros(1, channels, size, size, dtype=torch.float64)).shape[1]
    hidden = pick(5, 8)
    layers.append(nn.Linear(features, hidden))
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(hidden, classes))
    if trailing_affine if trailing_affine is not None else pick(False, False, True):
        layers.append(nn.BatchNorm1d(classes))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
                                   * 1.5 / math.sqrt(fan_in))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator, dtype=torch.float64) * 0.2)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                _randomize_batchnorm(layer, generator)
    model.eval()
    model.input_shape = (channels, size, size)
    model.classes = classes
    return model


def random_problem(seed: int, batch: int = 3, specs: int = 4, **network):
    model = random_network(seed, **network)
    generator = torch.Generator().manual_seed(seed + 1)
    ops = lower_network(model, detach=True)
    center = torch.rand(batch, *model.input_shape, generator=generator, dtype=torch.float64)
    eps = float(torch.rand(1, generator=generator)) * 0.25 + 0.02
    box = linf_box(center, eps)
    spec = torch.randn(batch, specs, model.classes, generator=generator, dtype=torch.float64)
    return model, ops, box, spec, generator


def sampled_outputs(ops, box: Box, generator: torch.Generator, count: int = SAMPLES):
    """Network outputs at ``count`` points of the box per sample: (count, B, K), and the points."""
    points = sample_in_box(box, count, generator)
    outputs = run_ops(ops, points.reshape(-1, *box.lower.shape[1:]))
    return outputs.reshape(count, box.lower.shape[0], -1), points


def spec_values(outputs, spec):
    return torch.einsum("nbk,bsk->nbs", outputs, spec)


def assert_sound_lower(lower, values):
    """lower (B, S) <= every sampled value (N, B, S)."""
    gap = lower - values.min(dim=0).values
    assert (gap <= TOLERANCE).all(), f"unsound by {gap.max().item():.3e}"


# ----------------------------------------------------------------------------------------------
# (a) soundness


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_crown_bounds_are_sound(seed):
    model, ops, box, spec, generator = random_problem(seed)
    values = spec_values(sampled_outputs(ops, box, generator)[0], spec)
    for mode in ("crown-ibp", "crown"):
        lower = crown_bounds(ops, box, spec, mode=mode)
        assert lower.shape == spec.shape[:2]
        assert_sound_lower(lower, values)
    upper = crown_upper_bounds(ops, box, spec, mode="crown")
    assert (upper - values.max(dim=0).values >= -TOLERANCE).all()


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_crown_with_random_alphas_is_sound(seed):
    model, ops, box, spec, generator = random_problem(seed)
    values = spec_values(sampled_outputs(ops, box, generator)[0], spec)
    intermediate = intermediate_bounds(ops, box, "crown")
    for scale in (1.0, 3.0):  # scale 3: slopes outside [0, 1] are clamped, still sound
        alphas = {index: (torch.rand(box.lower.shape[0], spec.shape[1], *pre.lower.shape[1:],
                                     generator=generator, dtype=torch.float64) - 0.5) * scale + 0.5
                  for index, pre in intermediate.items()}
        assert_sound_lower(crown_bounds(ops, box, spec, intermediate, alphas), values)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_alpha_crown_is_sound_and_not_looser_than_crown(seed):
    model, ops, box, spec, generator = random_problem(seed)
    values = spec_values(sampled_outputs(ops, box, generator)[0], spec)
    for mode in ("crown-ibp", "crown"):
        intermediate = intermediate_bounds(ops, box, mode)
        crown = crown_bounds(ops, box, spec, intermediate)
        result = alpha_crown(ops, box, spec, intermediate, iterations=15, lr=0.2)
        assert_sound_lower(result.lower, values)
        assert (result.lower >= crown - 1e-6).all()  # (c)
        # The returned slopes reproduce the returned bound.
        again = crown_bounds(ops, box, spec, intermediate, result.alphas)
        assert torch.allclose(again, result.lower, atol=1e-9)
        shared = alpha_crown_bounds(ops, box, spec, intermediate, iterations=5, shared_alpha=True)
        assert_sound_lower(shared, values)
        assert (shared >= crown - 1e-6).all()


def test_alpha_crown_improves_on_a_fixed_network():
    model, ops, box, spec, generator = random_problem(3, batch=4, relu=True)
    intermediate = intermediate_bounds(ops, box, "crown-ibp")
    crown = crown_bounds(ops, box, spec, intermediate)
    result = alpha_crown(ops, box, spec, intermediate, iterations=20)
    assert result.lower.sum() > crown.sum()
    assert result.history[0] == pytest.approx(float(crown.sum()))


def test_alpha_crown_reaches_the_best_slopes_of_a_grid():
    """One hidden layer of 3 ReLUs: the bound is concave in the slopes, so projected Adam
    should come close to the best of a 21^3 grid (and CROWN may be far from it)."""
    generator = torch.Generator().manual_seed(1)
    grid = torch.cartesian_prod(*[torch.linspace(0, 1, 21, dtype=torch.float64)] * 3)
    count = grid.shape[0]
    for _ in range(5):
        ops = (LinearOp(torch.randn(3, 2, generator=generator, dtype=torch.float64),
                        torch.randn(3, generator=generator, dtype=torch.float64) * 0.3),
               ReluOp(), LinearOp(torch.randn(1, 3, generator=generator, dtype=torch.float64), None))
        box = Box(-torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
        spec = torch.ones(1, 1, 1, dtype=torch.float64)
        pre = intermediate_bounds(ops, box)[1]
        many = {1: Box(pre.lower.expand(count, -1), pre.upper.expand(count, -1))}
        grid_bounds = crown_bounds(ops, Box(box.lower.expand(count, -1), box.upper.expand(count, -1)),
                                   spec.expand(count, -1, -1), many, {1: grid.view(count, 1, 3)})
        optimized = alpha_crown_bounds(ops, box, spec, iterations=50, lr=0.1)
        assert optimized.item() >= grid_bounds.max().item() - 0.02


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_splits_are_sound_on_their_subdomain(seed):
    model, ops, box, spec, generator = random_problem(seed, batch=2)
    outputs, points = sampled_outputs(ops, box, generator, count=4000)
    flat_points = points.reshape(-1, *box.lower.shape[1:])
    ibp = intermediate_bounds(ops, box, "ibp")
    split = {}
    satisfied = torch.ones(points.shape[:2], dtype=torch.bool)
    for index, pre in ibp.items():
        # Split only neurons that are unstable in sample 0 (about a fifth of them).
        unstable = (pre.lower[0] < 0) & (pre.upper[0] > 0)
        choice = torch.randint(-1, 2, pre.lower.shape[1:], generator=generator)
        chosen = unstable & (torch.rand(pre.lower.shape[1:], generator=generator) < 0.2)
        mask = torch.where(chosen, choice, torch.zeros_like(choice))
        split[index] = mask
        pre_values = run_ops(ops[:index], flat_points).reshape(*points.shape[:2], *pre.lower.shape[1:])
        ok = torch.where(mask > 0, pre_values >= 0, torch.where(mask < 0, pre_values <= 0, True))
        satisfied &= ok.flatten(2).all(dim=2)
    values = spec_values(outputs, spec)
    for mode in ("crown-ibp", "crown"):
        lower = crown_bounds(ops, box, spec, mode=mode, split=split)
        given_boxes = crown_bounds(ops, box, spec, intermediate_bounds(ops, box, mode, split=split))
        assert torch.equal(lower, given_boxes)
        for b in range(box.lower.shape[0]):
            kept = values[satisfied[:, b], b]
            if len(kept):
                assert (lower[b] - kept.min(dim=0).values <= TOLERANCE).all()
        alpha = alpha_crown_bounds(ops, box, spec, mode=mode, split=split, iterations=5)
        for b in range(box.lower.shape[0]):
            kept = values[satisfied[:, b], b]
            if len(kept):
                assert (alpha[b] - kept.min(dim=0).values <= TOLERANCE).all()


# ----------------------------------------------------------------------------------------------
# (b) CROWN-IBP margins


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_crown_ibp_margins_combined_with_ibp(seed):
    model, ops, box, spec, generator = random_problem(seed, trailing_affine=False)
    labels = torch.randint(model.classes, (box.lower.shape[0],), generator=generator)
    ibp_lower, _ = ibp_margin_lower(ops, box, labels)
    crown_lower = crown_ibp_margin_lower(ops, box, labels, model.classes)
    assert crown_lower.shape == ibp_lower.shape
    assert (crown_lower.gather(1, labels.unsqueeze(1)) == 0).all()
    combined = torch.maximum(ibp_lower, crown_lower)
    assert (combined >= ibp_lower).all()
    outputs = sampled_outputs(ops, box, generator)[0]
    margins = outputs.gather(2, labels.view(1, -1, 1).expand(outputs.shape[0], -1, 1)) - outputs
    assert_sound_lower(combined, margins)
    expected = crown_bounds(ops, box, margin_spec(labels, model.classes, torch.float64), mode="crown-ibp")
    assert torch.allclose(crown_lower, expected.scatter(1, labels.unsqueeze(1), 0.0))
    for options in ({"mode": "crown"}, {"mode": "crown", "alpha_iterations": 5}):
        lower = crown_margin_lower(ops, box, labels, model.classes, **options)
        assert (lower.gather(1, labels.unsqueeze(1)) == 0).all()
        assert_sound_lower(lower, margins)


def test_crown_ibp_is_differentiable_in_the_weights():
    model = random_network(5)
    ops = lower_network(model)
    box = linf_box(torch.rand(2, *model.input_shape, dtype=torch.float64), 0.1)
    labels = torch.tensor([0, 1])
    loss = -crown_ibp_margin_lower(ops, box, labels, model.classes).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# (d) intermediate bounds


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_crown_intermediate_bounds_are_sound_and_tighter_than_ibp(seed):
    model, ops, box, spec, generator = random_problem(seed)
    points = sample_in_box(box, SAMPLES, generator).reshape(-1, *box.lower.shape[1:])
    ibp = intermediate_bounds(ops, box, "ibp")
    crown = intermediate_bounds(ops, box, "crown")
    chunked = intermediate_bounds(ops, box, "crown", max_elements=1, unstable_only=False)
    boxes = interval_bounds(ops, box)
    assert set(ibp) == set(crown) == set(relu_indices(ops))
    for index in ibp:
        assert torch.equal(ibp[index].lower, boxes[index - 1].lower)
        # IBP continues from the tightened boxes: tighter, up to rounding where nothing changed.
        assert (crown[index].lower >= ibp[index].lower - 1e-12).all()
        assert (crown[index].upper <= ibp[index].upper + 1e-12).all()
        # Every neuron bounded (one row per chunk) is at least as tight as the unstable-only run.
        assert (chunked[index].lower >= crown[index].lower - 1e-9).all()
        assert (chunked[index].upper <= crown[index].upper + 1e-9).all()
        values = run_ops(ops[:index], points).reshape(SAMPLES, *ibp[index].lower.shape)
        for pre in (crown[index], chunked[index]):
            assert (values >= pre.lower - TOLERANCE).all() and (values <= pre.upper + TOLERANCE).all()


def test_crown_intermediate_bounds_are_strictly_tighter_somewhere():
    model, ops, box, spec, generator = random_problem(11, batch=4)
    ibp = intermediate_bounds(ops, box, "ibp")
    crown = intermediate_bounds(ops, box, "crown")
    deepest = max(ibp)
    assert (crown[deepest].upper - crown[deepest].lower).sum() < (ibp[deepest].upper - ibp[deepest].lower).sum()


def test_crown_layers_limits_where_crown_is_used():
    model, ops, box, spec, generator = random_problem(11, batch=2)
    ibp = intermediate_bounds(ops, box, "ibp")
    first, *rest = sorted(ibp)
    limited = intermediate_bounds(ops, box, "crown", crown_layers=[first])
    # The first ReLU follows a single conv (and per-channel affines): IBP is exact there.
    assert torch.equal(limited[rest[0]].lower, ibp[rest[0]].lower)


# ----------------------------------------------------------------------------------------------
# (e) the conv backward rule is the transpose of the conv's matrix


@pytest.mark.parametrize("size,stride,padding,kernel", [
    ((7, 7), (2, 2), (1, 1), (3, 3)),
    ((8, 8), (2, 2), (1, 1), (3, 3)),   # output_padding 1
    ((8, 9), (2, 3), (0, 1), (3, 2)),   # asymmetric
    ((6, 6), (1, 1), (2, 2), (5, 5)),
])
def test_conv_backward_equals_dense_matrix(size, stride, padding, kernel):
    generator = torch.Generator().manual_seed(0)
    in_channels, out_channels = 2, 3
    weight = torch.randn(out_channels, in_channels, *kernel, generator=generator, dtype=torch.float64)
    bias = torch.randn(out_channels, generator=generator, dtype=torch.float64)
    op = ConvOp(weight, bias, stride, padding)
    input_shape = (in_channels, *size)
    inputs = math.prod(input_shape)
    basis = torch.eye(inputs, dtype=torch.float64).reshape(inputs, *input_shape)
    columns = F.conv2d(basis, weight, None, stride, padding)  # (inputs, *output shape)
    output_shape = tuple(columns.shape[1:])
    dense = columns.reshape(inputs, -1).T  # (outputs, inputs): conv(x) = dense @ x + bias
    A = torch.randn(2, 3, *output_shape, generator=generator, dtype=torch.float64)
    offset = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    result = BACKWARD_RULES[ConvOp](op, LinearBound(A, offset), BackwardContext(input_shape))
    assert result.A.shape == (2, 3, *input_shape)
    assert torch.allclose(result.A.flatten(2), A.flatten(2) @ dense, atol=1e-12)
    bias_dense = bias.repeat_interleave(math.prod(output_shape[1:]))
    assert torch.allclose(result.bias, offset + A.flatten(2) @ bias_dense, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# (f) exactness without ReLUs


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 2))
def test_crown_is_exact_on_linear_networks(seed):
    model, ops, box, spec, generator = random_problem(seed, relu=False)
    assert not any(isinstance(op, ReluOp) for op in ops)
    lower = crown_bounds(ops, box, spec)
    # The minimum of the affine map x -> C f(x) is reached at the corner picked by its gradient.
    batch, specs = spec.shape[:2]
    x = box.center.clone().requires_grad_(True)
    values = torch.einsum("bk,bsk->bs", run_ops(ops, x), spec)
    gradients = torch.stack([torch.autograd.grad(values[:, s].sum(), x, retain_graph=True)[0]
                             for s in range(specs)], dim=1)  # (B, S, *input)
    corners = torch.where(gradients > 0, box.lower.unsqueeze(1), box.upper.unsqueeze(1))
    at_corners = run_ops(ops, corners.reshape(batch * specs, *box.lower.shape[1:])).reshape(batch, specs, -1)
    true_min = torch.einsum("bsk,bsk->bs", at_corners, spec)
    assert torch.allclose(lower, true_min, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------
# dtypes and devices


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_float32_and_devices(device):
    model, ops64, box64, spec64, generator = random_problem(7, batch=2)
    model = model.float().to(device)
    ops = lower_network(model, detach=True)
    box = Box(box64.lower.float().to(device), box64.upper.float().to(device))
    spec = spec64.float().to(device)
    reference = crown_bounds(ops64, box64, spec64, mode="crown")
    lower = crown_bounds(ops, box, spec, mode="crown")
    assert lower.dtype == torch.float32 and lower.device.type == device
    assert torch.allclose(lower.double().cpu(), reference, atol=1e-3, rtol=1e-3)
    alpha = alpha_crown_bounds(ops, box, spec, iterations=3)
    assert alpha.dtype == torch.float32 and (alpha >= crown_bounds(ops, box, spec) - 1e-5).all()
    margins = crown_ibp_margin_lower(ops, box, torch.tensor([0, 1], device=device), model.classes)
    assert margins.shape == (2, model.classes)


def test_spec_without_batch_dim_broadcasts():
    model, ops, box, spec, generator = random_problem(2, batch=3)
    shared = spec[0]
    lower = crown_bounds(ops, box, shared)
    assert lower.shape == (3, spec.shape[1])
    assert torch.allclose(lower, crown_bounds(ops, box, shared.expand(3, -1, -1)))
