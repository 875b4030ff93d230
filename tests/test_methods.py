"""Every training method: its loss at eps = 0, its relation to neighbouring methods, its gradients."""
import pytest
import torch
import torch.nn.functional as F

from ctbench.config import config_from_dict
from ctbench.methods import METHODS, StepInputs
from ctbench.methods.taps import linked_point, split_index, taps_loss
from ctbench.models import InputSpec, build_model, initialize
from ctbench.models.ops import FlattenOp, ReluOp, clean_forward, lower_network
from ctbench.bounds import Box
from ctbench.training import make_method

SPEC = InputSpec(1, 12, 4, (0.1,), (0.9,))


def model_and_batch(seed=0, architecture="cnn5"):
    torch.manual_seed(seed)
    model = build_model(architecture, SPEC, True).double()
    initialize(model, "ibp")
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((6, 1, 12, 12), generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=generator)
    return model, x, y


def step_inputs(model, x, y, eps, eps_target=0.2):
    logits, stats = clean_forward(model, x)
    return StepInputs(model, x, y, eps, eps_target, lower_network(model, stats),
                      lower_network(model, stats.detached(), detach=True), logits, stats, 4)


def method(name, seed_attack=True, **options):
    data = {"method": {"name": name, **options}, "attack": {"steps": 4, "restarts": 2}}
    return make_method(config_from_dict(data))


def loss_of(name, eps, eps_target=0.2, seed=0, **options):
    model, x, y = model_and_batch()
    torch.manual_seed(seed)
    step = step_inputs(model, x, y, eps, eps_target)
    return method(name, **options).robust_loss(step), F.cross_entropy(step.clean_logits, y), model


@pytest.mark.parametrize("name", METHODS.names())
def test_robust_loss_at_zero_eps_equals_natural_loss(name):
    # EDAC's certainty step moves the weights even without perturbation; its attack part is checked here
    options = {"certainty_step": 0.0} if name == "edac" else {}
    robust, natural, _ = loss_of(name, 0.0, **options)
    assert torch.allclose(robust.loss, natural, atol=1e-9), name


@pytest.mark.parametrize("name", METHODS.names())
def test_gradients_are_finite_and_reach_every_layer(name):
    robust, _, model = loss_of(name, 0.2, eps_target=0.2)
    robust.loss.backward()
    weights = [m.weight for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for weight in weights:
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
        assert weight.grad.abs().sum() > 0, name


def test_sabr_at_lambda_one_equals_ibp():
    sabr, _, _ = loss_of("sabr", 0.15, eps_shrink=1.0)
    ibp, _, _ = loss_of("ibp", 0.15)
    assert torch.allclose(sabr.loss, ibp.loss)


def test_sabr_small_box_lies_inside_the_eps_box_and_is_looser_than_nothing():
    from ctbench.methods.sabr import small_box

    model, x, y = model_and_batch()
    step = step_inputs(model, x, y, 0.2)
    small = small_box(method("sabr", eps_shrink=0.4), step, 0.4)
    full = step.box()
    assert (small.lower >= full.lower - 1e-12).all() and (small.upper <= full.upper + 1e-12).all()
    assert torch.allclose(small.radius, 0.4 * full.radius)
    sabr, _, _ = loss_of("sabr", 0.2, eps_shrink=0.4)
    ibp, _, _ = loss_of("ibp", 0.2)
    assert sabr.loss < ibp.loss  # a smaller box gives a smaller bound


def test_mtl_ibp_interpolates_between_pgd_and_ibp():
    ibp, _, _ = loss_of("ibp", 0.1)
    pgd, _, _ = loss_of("pgd", 0.1, seed=3)
    assert torch.allclose(loss_of("mtl_ibp", 0.1, ibp_coefficient=1.0, seed=3)[0].loss, ibp.loss)
    assert torch.allclose(loss_of("mtl_ibp", 0.1, ibp_coefficient=0.0, seed=3)[0].loss, pgd.loss)
    half = loss_of("mtl_ibp", 0.1, ibp_coefficient=0.5, seed=3)[0].loss
    assert torch.allclose(half, (ibp.loss + pgd.loss) / 2)


def test_edac_without_certainty_step_is_pgd_and_with_it_differs():
    pgd, _, _ = loss_of("pgd", 0.1, seed=4)
    assert torch.allclose(loss_of("edac", 0.1, certainty_step=0.0, seed=4)[0].loss, pgd.loss)
    assert not torch.allclose(loss_of("edac", 0.1, certainty_step=0.5, seed=4)[0].loss, pgd.loss)


def test_taps_falls_back_to_ibp_during_warmup():
    taps, _, _ = loss_of("taps", 0.1, eps_target=0.2)
    ibp, _, _ = loss_of("ibp", 0.1)
    assert torch.allclose(taps.loss, ibp.loss)


def test_taps_estimate_lies_between_attack_and_ibp():
    """Each latent PGD point lies in the IBP latent box, so every TAPS margin is at least the
    IBP margin lower bound: TAPS-CE <= IBP-CE; and at least the input-space attack's loss
    is not a bound, but TAPS-CE >= CE at the clean input's latent point is."""
    model, x, y = model_and_batch()
    step = step_inputs(model, x, y, 0.2, 0.2)
    result = taps_loss(method("taps"), step, step.box(), method("taps").options)
    assert result.metrics["taps_loss"] <= result.metrics["ibp_loss"] + 1e-9
    assert result.metrics["taps_loss"] >= F.cross_entropy(step.clean_logits, y).item() - 1e-9
    assert torch.allclose(result.loss, torch.tensor(result.metrics["taps_loss"] * result.metrics["ibp_loss"], dtype=torch.float64))


def test_taps_split_keeps_the_requested_relu_layers_in_the_head():
    model, _, _ = model_and_batch()
    ops = lower_network(model)
    for size in (1, 2, 3):
        head = ops[split_index(ops, size):]
        assert sum(isinstance(op, ReluOp) for op in head) == size
        assert not isinstance(head[0], FlattenOp)  # the attack runs on flat latent points
    with pytest.raises(ValueError, match="classifier_size"):
        split_index(ops, 4)  # CNN5 has 4 ReLU layers: nothing would be left to bound with IBP


def test_taps_gradient_link_is_rectified_linear_and_scaled():
    lower = torch.zeros(1, 3, requires_grad=True)
    upper = torch.ones(1, 3, requires_grad=True)
    point = torch.tensor([[[0.1, 0.5, 0.9]]])  # (batch, targets, features)
    linked = linked_point(point, Box(lower, upper), gradient_scale=2.0)
    assert torch.equal(linked.detach(), point)
    linked.sum().backward()
    # upper: 0 below ub - 0.5 width, then (p - 0.5) / 0.5; lower: symmetric; times the scale 2
    assert torch.allclose(upper.grad, 2 * torch.tensor([[0.0, 0.0, 0.8]]))
    assert torch.allclose(lower.grad, 2 * torch.tensor([[0.8, 0.0, 0.0]]))


def test_staps_with_lambda_one_is_taps():
    staps, _, _ = loss_of("staps", 0.2, eps_target=0.2, eps_shrink=1.0, seed=5)
    taps, _, _ = loss_of("taps", 0.2, eps_target=0.2, seed=5)
    assert torch.allclose(staps.loss, taps.loss)


def test_fused_crown_ibp_bounds_the_worst_case_cross_entropy():
    from ctbench.bounds import sample_in_box
    from ctbench.bounds.crown import intermediate_bounds
    from ctbench.methods.crown_ibp import fused_cross_entropy_bound
    from ctbench.models.ops import run_ops

    model, x, y = model_and_batch(seed=7)
    step = step_inputs(model, x, y, 0.05, 0.05)
    box = step.box()
    bound = fused_cross_entropy_bound(step, box, intermediate_bounds(step.ops, box, "crown-ibp"))
    points = sample_in_box(box, 300, torch.Generator().manual_seed(0))
    logits = run_ops(step.ops, points.flatten(0, 1)).detach()
    sampled = F.cross_entropy(logits, y.repeat(300), reduction="none").view(300, -1).max(dim=0).values
    assert (bound >= sampled - 1e-9).all()
    unfused = method("crown_ibp", loss_fusion=False).robust_loss(step).loss
    assert bound.mean() > F.cross_entropy(step.clean_logits, y)
    assert torch.isfinite(unfused)


def test_fused_crown_ibp_is_finite_where_unshifted_exponentials_overflow():
    model, x, y = model_and_batch(seed=8)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.weight.mul_(30)
    model.float()
    step = step_inputs(model, x.float(), y, 1.0, 1.0)
    from ctbench.bounds import ibp_margin_lower

    margin_lower, _ = ibp_margin_lower(step.ops, step.box(), y)
    assert torch.isinf(torch.exp(-margin_lower)).any()  # what an unshifted exp(-lb) would give
    loss = method("crown_ibp").robust_loss(step).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _attack_of(name, **attack):
    return make_method(config_from_dict({"method": {"name": name}, "attack": attack})).attack_settings()


def test_training_attacks_step_the_reference_fraction_of_the_half_width():
    from ctbench.methods.taps import latent_step_fraction

    for name in ("sabr", "staps"):
        assert _attack_of(name, steps=10).step_size == 0.2 and _attack_of(name, steps=1).step_size == 0.2
    for name in ("pgd", "mtl_ibp", "edac"):
        assert _attack_of(name, steps=10).step_size == 0.25 and _attack_of(name, steps=1).step_size == 2.0
    assert latent_step_fraction(10) == 0.4 and latent_step_fraction(5) == 0.8  # 0.2 / 2/steps x the width
    reference = _attack_of("sabr")
    assert (reference.step_relative_to, reference.step_schedule, reference.random_start) == (
        "half_width", "constant", "clamped_noise")
    assert _attack_of("sabr", step_relative_to="width").step_size == 0.1  # the same length, of the width
    assert _attack_of("pgd", step_size=0.3, step_relative_to="width").step_size == 0.3  # set: taken as given


def test_training_attacks_start_around_the_clean_input():
    from ctbench.methods.pgd import adversarial_point

    model, x, y = model_and_batch()
    x[:, :, :2] = 0.0  # the top rows are black: their random starts land on the face 0 half of the time
    step = step_inputs(model, x, y, 0.2)
    config = config_from_dict({"method": {"name": "sabr"}, "attack": {"steps": 0, "restarts": 1}})
    start = adversarial_point(make_method(config), step)
    assert step.box().contains(start).all()
    assert 0.3 < (start[:, :, :2] == 0).float().mean() < 0.7
