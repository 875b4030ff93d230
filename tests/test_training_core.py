"""Trainer building blocks: BatchNorm policy, schedules, regularizers, methods, accumulation."""

import pytest
import torch
import torch.nn.functional as F

from ctbench.bounds import Box, interval_bounds, linf_box
from ctbench.config import config_from_dict
from ctbench.models import InputSpec, Normalize, build_model, initialize
from ctbench.models.ops import batch_statistics, clean_forward, lower_network, run_ops
from ctbench.training import StepSettings, compute_step_gradients, make_method
from ctbench.training.batchnorm import recompute_population_statistics
from ctbench.training.regularizers import _relu_layer_sums, own_sums, shi_input_box, shi_warmup_penalty
from ctbench.training.schedules import eps_at, lr_at, smooth_ramp
from ctbench.data import Split

SPEC = InputSpec(1, 12, 4, (0.1,), (0.9,))


def tiny_model(seed=0, dtype=torch.float64, init="ibp"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*build_model("cnn3", SPEC, True)).to(dtype)
    initialize(model, init)
    return model


def tiny_config(method_name="ibp", **overrides):
    data = {"method": {"name": method_name, **overrides.pop("method", {})},
            "attack": {"steps": 3, "restarts": 2, "random_start": "center"}}
    data.update(overrides)
    return config_from_dict(data)


def batch(seed=0, size=8, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((size, 1, 12, 12), generator=generator, dtype=dtype), torch.randint(0, 4, (size,), generator=generator)


def test_clean_forward_matches_torch_training_mode_and_returns_batch_statistics():
    model = tiny_model()
    x, _ = batch()
    logits, stats = clean_forward(model, x)
    reference = model.train()(x)
    model.eval()
    assert torch.allclose(logits, reference)
    ops = lower_network(model, stats)
    assert torch.allclose(run_ops(ops, x), reference)  # lowering with the same stats reproduces the pass


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "features"])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_batch_statistics_equal_var_mean_in_value_and_gradient(layout, offset):
    """The CPU statistics (shifted plain sums, not var_mean) against float64 var_mean, in float32
    with a mean up to 3e4 standard deviations from 0, where E[x^2] - E[x]^2 unshifted cancels."""
    generator = torch.Generator().manual_seed(5)
    shape = (6, 512) if layout == "features" else (6, 5, 7, 7)
    values = torch.randn(shape, generator=generator) * 0.01 + offset + torch.arange(shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    if layout == "channels_last":
        values = values.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, shape[1], generator=generator, dtype=torch.float64)
    x = values.clone().requires_grad_()
    mean, var = batch_statistics(x)
    ((mean.double() * weights[0]).sum() + (var.double() * weights[1] * 1e4).sum()).backward()
    exact = values.double().requires_grad_()
    dims = [d for d in range(len(shape)) if d != 1]
    exact_var, exact_mean = torch.var_mean(exact, dim=dims, unbiased=False)
    ((exact_mean * weights[0]).sum() + (exact_var * weights[1] * 1e4).sum()).backward()
    assert torch.allclose(mean.double(), exact_mean, rtol=1e-6, atol=1e-8)
    assert torch.allclose(var.double(), exact_var, rtol=1e-3, atol=0), ((var - exact_var) / exact_var).abs().max()
    assert torch.allclose(x.grad.double(), exact.grad, rtol=1e-3, atol=1e-3 * exact.grad.abs().max().item())


def test_population_statistics_of_one_batch_are_its_batch_statistics():
    model = tiny_model()
    x, y = batch(size=16)
    recompute_population_statistics(model, Split((x * 255).round().to(torch.uint8), y), 16, "cpu")
    images = (x * 255).round() / 255
    _, stats = clean_forward(model, images.to(torch.float64))
    for index, (mean, var) in stats.per_layer.items():
        assert torch.allclose(model[index].running_mean.double(), mean, atol=1e-5)
        assert torch.allclose(model[index].running_var.double(), var, atol=1e-5)
    assert torch.allclose(model.eval()(images), run_ops(lower_network(model), images))


def test_population_variance_is_the_total_variance_over_batches():
    model = tiny_model()
    images = torch.randint(0, 256, (32, 1, 12, 12), dtype=torch.uint8)
    recompute_population_statistics(model, Split(images, torch.zeros(32, dtype=torch.long)), 8, "cpu")
    x = images.double() / 255
    first_bn = next(i for i, m in enumerate(model) if isinstance(m, torch.nn.BatchNorm2d))
    pre = model[:first_bn](x)  # layers before the first BatchNorm do not depend on statistics
    assert torch.allclose(model[first_bn].running_mean.double(), pre.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model[first_bn].running_var.double(), pre.var(dim=(0, 2, 3), unbiased=False), atol=1e-4)


def test_smooth_ramp_is_continuous_monotone_and_hits_its_ends():
    points = [smooth_ramp(t / 1000) for t in range(1001)]
    assert points[0] == 0 and abs(points[-1] - 1) < 1e-12
    assert all(b >= a for a, b in zip(points, points[1:]))
    slopes = [(b - a) * 1000 for a, b in zip(points, points[1:])]
    assert max(abs(b - a) for a, b in zip(slopes, slopes[1:])) < 0.05  # no kink where power meets line
    assert abs(smooth_ramp(0.125) - smooth_ramp(0.25) / 16) < 1e-12  # t^4 on the first quarter


def test_eps_schedule_phases():
    config = tiny_config(eps={"train_eps": 0.3, "test_eps": 0.3, "standard_epochs": 1, "ramp_start_epoch": 1,
                              "ramp_end_epoch": 3})
    assert eps_at(config.eps, 0, 5, 10) == 0.0
    assert eps_at(config.eps, 1, 0, 10) == 0.0
    assert 0 < eps_at(config.eps, 2, 0, 10) < 0.3
    assert eps_at(config.eps, 3, 0, 10) == pytest.approx(0.3)
    assert lr_at(config.optim, 49) == 5e-4 and lr_at(config.optim, 50) == pytest.approx(1e-4)
    assert lr_at(config.optim, 65) == pytest.approx(2e-5)


def _robust_and_natural(method_name, eps, **overrides):
    model = tiny_model()
    config = tiny_config(method_name, **overrides)
    method = make_method(config)
    x, y = batch()
    from ctbench.methods import StepInputs

    logits, stats = clean_forward(model, x)
    step = StepInputs(model, x, y, eps, 0.2, lower_network(model, stats),
                      lower_network(model, stats.detached(), detach=True), logits, stats, 4)
    return method.robust_loss(step).loss, F.cross_entropy(logits, y), model


@pytest.mark.parametrize("method", ["standard", "ibp", "pgd"])
def test_robust_loss_at_zero_eps_is_the_natural_loss(method):
    robust, natural, _ = _robust_and_natural(method, 0.0)
    assert torch.allclose(robust, natural, atol=1e-10)


@pytest.mark.parametrize("method", ["ibp", "pgd"])
def test_robust_loss_grows_with_eps_and_has_finite_gradients(method):
    values = []
    for eps in (0.0, 0.05, 0.2):
        robust, natural, model = _robust_and_natural(method, eps)
        robust.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        values.append(robust.item())
    assert values[0] <= values[1] + 1e-9 <= values[2] + 2e-9


def test_ibp_loss_upper_bounds_pgd_loss():
    pgd, _, _ = _robust_and_natural("pgd", 0.1)
    ibp, _, _ = _robust_and_natural("ibp", 0.1)
    assert ibp.item() >= pgd.item()


def _gradients(method_name, chunks, eps, w_rob):
    model = tiny_model(seed=1)
    config = tiny_config(method_name, optim={"batch_size": 8, "accumulation_steps": chunks},
                         method={"w_rob": w_rob}, regularization={"l1": 1e-4})
    x, y = batch(seed=2)
    compute_step_gradients(model, make_method(config), config, StepSettings(eps, 0.2, 4), x, y)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method,w_rob", [("standard", 1.0), ("ibp", 1.0), ("ibp", 0.6), ("pgd", 0.7)])
def test_accumulated_gradient_equals_full_batch(method, w_rob):
    full = _gradients(method, 1, 0.2, w_rob)
    accumulated = _gradients(method, 4, 0.2, w_rob)
    for a, b in zip(full, accumulated):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    # the statistics matter: sub-batch statistics would give another gradient
    assert any(g.abs().max() > 1e-8 for g in full)


def test_sub_batch_statistics_would_differ():
    """The accumulation test can fail: normalizing each sub-batch by its own statistics
    changes the gradient, so equality above comes from reusing the full-batch statistics."""
    model = tiny_model(seed=1)
    x, y = batch(seed=2)
    full_logits, _ = clean_forward(model, x)
    split_logits = torch.cat([clean_forward(model, part)[0] for part in x.chunk(4)])
    assert not torch.allclose(full_logits, split_logits, atol=1e-6)


def _shi_network():
    """MNIST's normalization, 4 pixels -> 2 ReLUs -> 3 classes; each ReLU input is 4 x the sum of
    two normalized pixels, centred at 0 for x = 0.5, so both ReLUs are unstable and the balance
    term is empty: the penalty is the tightness term alone."""
    model = torch.nn.Sequential(Normalize((0.1307,), (0.3081,)), torch.nn.Flatten(), torch.nn.Linear(4, 2),
                                torch.nn.ReLU(), torch.nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[4.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]]))
        model[2].bias.fill_(-8 * (0.5 - 0.1307) / 0.3081)
        model[4].weight.fill_(1.0)
    return model


@pytest.mark.parametrize("space", ["normalized", "pixel"])
def test_shi_tightness_compares_layer_radii_with_the_normalized_input_radius(space):
    config = config_from_dict({"method": {"name": "ibp"}, "regularization": {"shi_weight": 0.5, "shi_input_space": space}})
    x, y = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64), torch.tensor([0])
    model = _shi_network()
    metrics = compute_step_gradients(model, make_method(config), config, StepSettings(0.05, 0.1, 3), x, y)
    # layer radius 8 x 0.05 / std; input radius 0.05 / std after the normalization, 0.05 before it
    std = model[0].std.item()  # 0.3081 as stored (float32)
    ratio = 1 / 8 if space == "normalized" else std / 8
    assert metrics["shi_penalty"] == pytest.approx((0.5 - ratio) / 0.5, rel=1e-9)


def _literal_shi_penalty(input_box, pre_boxes, tolerance=0.5):
    """Shi et al.'s regularizer written from its definition, with masks (the oracle)."""
    input_radius = input_box.radius.mean()
    total = 0
    for pre in pre_boxes:
        center, radius = pre.center, pre.radius
        active, inactive = pre.lower > 0, pre.upper < 0
        mean = center.mean()
        total = total + F.relu(tolerance - input_radius / radius.mean()) / tolerance
        if active.any() and inactive.any():  # else the ratios are 0/0 and the layer adds no balance term
            for ratio in (center[active].sum() / -center[inactive].sum(),
                          ((center[active] - mean) ** 2).sum() / ((center[inactive] - mean) ** 2).sum()):
                total = total + F.relu(tolerance - torch.minimum(ratio, 1 / ratio)) / tolerance
    return total / len(pre_boxes)


@pytest.mark.parametrize("eps", [0.02, 0.05])  # at 0.05 the second ReLU layer has no stable neuron
def test_shi_penalty_equals_its_definition_in_value_and_gradient(eps):
    model = tiny_model(seed=6)
    x, _ = batch(seed=7, size=16)
    ops = lower_network(model, clean_forward(model, x)[1], fold=True)
    box = linf_box(x, eps)
    boxes = interval_bounds(ops[:-1], box)
    relu_inputs = [boxes[i - 1] for i, op in enumerate(ops) if type(op).__name__ == "ReluOp"]
    stable = [bool((b.lower > 0).any() and (b.upper < 0).any()) for b in relu_inputs]
    assert stable == ([True, True] if eps == 0.02 else [True, False])
    ours = shi_warmup_penalty(ops, box, boxes)
    literal = _literal_shi_penalty(box, relu_inputs)
    assert ours.item() == pytest.approx(literal.item(), rel=1e-10)
    parameters = list(model.parameters())
    gradients = [g for g in torch.autograd.grad(ours, parameters, retain_graph=True, allow_unused=True) if g is not None]
    expected = [g for g in torch.autograd.grad(literal, parameters, allow_unused=True) if g is not None]
    assert len(gradients) == len(expected) >= 4
    for a, b in zip(gradients, expected):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_shi_layer_sums_in_float32_equal_their_definitions_in_float64():
    """Pre-activation centres 50 +- 1 and 40 of 600 neurons below zero (layer mean about 13
    spreads from the active centres): the spreads around the layer mean come from float32 sums of
    c and c^2, which lose about (mean / spread)^2 x 1e-7 of their value to cancellation."""
    generator = torch.Generator().manual_seed(8)
    center = torch.randn(32, 600, generator=generator) + 50
    center[:, :40] -= 52
    radius = torch.rand(32, 600, generator=generator) * 0.5
    box = Box(center - radius, center + radius)
    sums = _relu_layer_sums(box, own_sums)
    exact = Box(box.lower.double(), box.upper.double())
    c, r = exact.center, exact.radius
    active, inactive = exact.lower > 0, exact.upper < 0
    mean = c.mean()
    expected = (r.sum(), c[active].sum(), c[inactive].sum(), ((c[active] - mean) ** 2).sum(),
                ((c[inactive] - mean) ** 2).sum(), c.numel())
    for value, exact in zip(sums, expected):
        assert value.item() == pytest.approx(float(exact), rel=1e-4)


def test_sabr_warmup_regularizer_is_measured_on_the_small_box(monkeypatch):
    import ctbench.methods.sabr as sabr

    small_boxes = []
    original = sabr.small_box

    def recording_small_box(*args):
        small_boxes.append(original(*args))
        return small_boxes[-1]

    monkeypatch.setattr(sabr, "small_box", recording_small_box)
    model = tiny_model(seed=3)
    x, y = batch(seed=4)

    def penalty_of(options):
        config = tiny_config("sabr", method={"eps_shrink": 0.4, **options}, regularization={"shi_weight": 0.5})
        return compute_step_gradients(model, make_method(config), config, StepSettings(0.1, 0.2, 4), x, y)["shi_penalty"]

    def penalty_on(box):
        ops = lower_network(model, clean_forward(model, x)[1], fold=True)
        return shi_warmup_penalty(ops, shi_input_box(model, box, "normalized"), interval_bounds(ops[:-1], box)).item()

    on_small = penalty_of({})
    assert on_small == pytest.approx(penalty_on(small_boxes[-1]), rel=1e-9)
    on_full = penalty_on(linf_box(x, 0.1))
    assert penalty_of({"regularizer_box": "full"}) == pytest.approx(on_full, rel=1e-9)
    assert on_small != pytest.approx(on_full, rel=1e-6)  # the two boxes give measurably different penalties


@pytest.mark.parametrize("key,value", [("regularization.shi_input_space", "logits"),
                                       ("attack.step_relative_to", "quarter_width"), ("attack.step_schedule", "cosine"),
                                       ("attack.random_start", "corner"), ("attack.step_size", 0),
                                       ("swa.every_steps", 0), ("method.regularizer_box", "tiny")])
def test_unknown_values_of_the_reference_keys_are_errors_naming_the_key(key, value):
    section, name = key.split(".")
    data = {"method": {"name": "sabr"}}
    data.setdefault(section, {})[name] = value
    with pytest.raises(ValueError, match=key):
        config_from_dict(data)


def test_mnist_is_normalized_in_the_first_layer_unless_data_normalize_is_false():
    from ctbench.data import DATASETS
    from ctbench.training import build_model_for

    def first_layer(normalize):
        config = config_from_dict({"data": {"normalize": normalize}, "model": {"architecture": "cnn3"}})
        return build_model_for(config, DATASETS.get("mnist").spec)[0]

    reference = first_layer(True)
    assert (reference.mean.item(), reference.std.item()) == pytest.approx((0.1307, 0.3081))
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(first_layer(False)(x), x)
