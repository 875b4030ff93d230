"""TAPS's fast latent attack (``margin_pgd``: chunked, hand-written gradient) computes what the
plain implementation it replaced computed: ``pgd_attack`` on the latent box repeated once per
target, under autograd. Same seed, same random starts; points, losses and parameter gradients
agree up to float rounding (float64 here)."""
import pytest
import torch
import torch.nn.functional as F

import ctbench.attacks.margin_pgd as margin_pgd_module
from ctbench.attacks import PGDSettings, pgd_attack
from ctbench.attacks.margin_pgd import margin_pgd
from ctbench.bounds import ibp_margin_lower, interval_bounds, worst_case_logits
from ctbench.config import config_from_dict
from ctbench.methods import StepInputs
from ctbench.methods.sabr import small_box
from ctbench.methods.taps import LINK_FRACTION, latent_step_fraction, split_index, taps_loss
from ctbench.models import InputSpec, build_model, initialize
from ctbench.models.ops import clean_forward, lower_network, run_ops
from ctbench.training import make_method

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = InputSpec(1, 12, 4, (0.1,), (0.9,))
CHANNELS_LAST = torch.channels_last


def target_margin(logits, label_and_target):
    return logits.gather(1, label_and_target[:, 1:2]).squeeze(1) - logits.gather(1, label_and_target[:, 0:1]).squeeze(1)


def reference_linked_point(point, latent, gradient_scale):
    """The attack point (value unchanged) with the rectified linear gradient link to the box
    bounds, by autograd through plain tensor expressions."""
    lower, upper = latent.lower.unsqueeze(1), latent.upper.unsqueeze(1)
    band = (LINK_FRACTION * (upper - lower)).detach().clamp(min=1e-12)
    point = point.detach()
    upper_weight = ((point - (upper.detach() - band)) / band).clamp(0, 1)
    lower_weight = (((lower.detach() + band) - point) / band).clamp(0, 1)
    link = upper_weight * (upper - upper.detach()) + lower_weight * (lower - lower.detach())
    return point + (link.detach() + gradient_scale * (link - link.detach()))


def reference_taps_loss(method, step, box, options):
    """The TAPS loss as computed before ``margin_pgd``: one PGD batch of every (sample, target)
    pair on the latent box repeated per target, gradients by autograd."""
    split = split_index(step.ops, options.classifier_size)
    extractor, head, attack_head = step.ops[:split], step.ops[split:], step.attack_ops[split:]
    latent = interval_bounds(extractor, box)[-1]
    labels, classes = step.labels, step.num_classes
    batch = labels.shape[0]
    others = torch.arange(classes).expand(batch, classes)
    targets = others[others != labels[:, None]].view(batch, classes - 1)
    pairs = torch.stack([labels[:, None].expand_as(targets), targets], dim=2).flatten(0, 1)
    repeated = latent.detach().repeat(classes - 1, interleave=True)
    settings = method.attack_settings(latent_step_fraction(method.config.attack.steps))
    points = pgd_attack(lambda z: run_ops(attack_head, z), repeated, pairs, settings, loss_fn=target_margin)
    points = points.view(batch, classes - 1, *points.shape[1:])
    head_logits = run_ops(head, reference_linked_point(points, latent, options.gradient_scale).flatten(0, 1))
    margins = -target_margin(head_logits, pairs).view(batch, classes - 1)
    margin_lower = torch.zeros(batch, classes, dtype=margins.dtype).scatter(1, targets, margins)
    taps = F.cross_entropy(worst_case_logits(margin_lower), labels)
    ibp = F.cross_entropy(worst_case_logits(ibp_margin_lower(head, latent, labels)[0]), labels)
    return taps * ibp


def training_step_inputs(memory_format=torch.contiguous_format, fold=True, eps=0.2, seed=0):
    """A float64 CNN5 and batch, lowered as the trainer lowers them (BatchNorm folded)."""
    torch.manual_seed(seed)
    model = build_model("cnn5", SPEC, True).double().to(memory_format=memory_format)
    initialize(model, "ibp")
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((7, 1, 12, 12), generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = torch.randint(0, 4, (7,), generator=generator)
    logits, stats = clean_forward(model, x)
    step = StepInputs(model, x, y, eps, eps, lower_network(model, stats, fold=fold),
                      lower_network(model, stats.detached(), detach=True, fold=fold), logits, stats, 4)
    return model, step


def make(name, classifier_size):
    return make_method(config_from_dict({"method": {"name": name, "classifier_size": classifier_size},
                                         "attack": {"steps": 5, "restarts": 2, "precision": "float32"}}))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 samples (conv head) or 6 (linear head), so that a batch of 7 runs as 3 + 3 + 1 or 6 + 1."""
    monkeypatch.setattr(margin_pgd_module, "CHUNK_ELEMENTS", 3 * 3 * 16 * 6 * 6)
    monkeypatch.setattr(margin_pgd_module, "LINEAR_CHUNK_ROWS", 1)


def parameter_gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [parameter.grad.clone() for parameter in model.parameters()]


@pytest.mark.parametrize("random_start", ["clamped_noise", "uniform", "center"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
@pytest.mark.parametrize("classifier_size", [1, 2])  # head: linear, ReLU, linear; or conv, ReLU, flatten, ...
def test_margin_pgd_finds_the_points_of_pgd_on_the_repeated_box(small_chunks, classifier_size, memory_format,
                                                                random_start):
    _, step = training_step_inputs(memory_format)
    split = split_index(step.ops, classifier_size)
    latent = interval_bounds(step.attack_ops[:split], step.box())[-1]
    head = tuple(step.attack_ops[split:])
    labels = step.labels
    targets = torch.stack([(labels + shift) % 4 for shift in (1, 2, 3)], dim=1)
    settings = PGDSettings(steps=5, restarts=3, step_size=0.4, step_relative_to="half_width",
                           step_schedule="decay", random_start=random_start)
    torch.manual_seed(11)
    fast = margin_pgd(head, latent, labels, targets, settings)
    torch.manual_seed(11)
    pairs = torch.stack([labels[:, None].expand_as(targets), targets], dim=2).flatten(0, 1)
    reference = pgd_attack(lambda z: run_ops(head, z), latent.repeat(3, interleave=True), pairs, settings,
                           loss_fn=target_margin)
    assert fast.shape == (7, 3, *latent.lower.shape[1:])
    assert torch.allclose(fast.flatten(0, 1), reference, rtol=0, atol=1e-12)
    if memory_format == CHANNELS_LAST and classifier_size == 2:
        assert fast.flatten(0, 1).is_contiguous(memory_format=CHANNELS_LAST)


def fast_taps_loss(method, step, box, options):
    return taps_loss(method, step, box, options).loss


def loss_and_gradients(loss_fn, name, classifier_size, memory_format, fold):
    """``loss_fn``'s TAPS or STAPS loss and parameter gradients on the same network, batch and seed."""
    method = make(name, classifier_size)
    model, step = training_step_inputs(memory_format, fold)
    torch.manual_seed(5)  # the same SABR and latent random starts
    box = small_box(method, step, method.options.eps_shrink) if name == "staps" else step.box()
    loss = loss_fn(method, step, box, method.options)
    return loss, parameter_gradients(model, loss)


@pytest.mark.parametrize("fold", [True, False])  # unfolded: the head holds a BatchNorm (channel affine) op
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
@pytest.mark.parametrize("classifier_size", [1, 2])
@pytest.mark.parametrize("name", ["taps", "staps"])
def test_taps_loss_and_gradients_equal_the_plain_implementation(small_chunks, name, classifier_size, memory_format,
                                                                fold):
    fast, fast_gradients = loss_and_gradients(fast_taps_loss, name, classifier_size, memory_format, fold)
    reference, reference_gradients = loss_and_gradients(reference_taps_loss, name, classifier_size, memory_format, fold)
    assert torch.allclose(fast, reference, rtol=1e-12, atol=0)
    scale = max(gradient.abs().max() for gradient in reference_gradients)  # gradients that are 0 get rounding noise
    for fast_gradient, reference_gradient in zip(fast_gradients, reference_gradients, strict=True):
        assert torch.allclose(fast_gradient, reference_gradient, rtol=1e-9, atol=1e-12 * scale)


def test_margin_pgd_in_reduced_precision_keeps_its_points_in_the_box():
    _, step = training_step_inputs()
    split = split_index(step.ops, 1)
    latent = interval_bounds(step.attack_ops[:split], step.box())[-1]
    targets = torch.stack([(step.labels + shift) % 4 for shift in (1, 2, 3)], dim=1)
    settings = PGDSettings(steps=3, restarts=2, precision="bfloat16")
    points = margin_pgd(tuple(step.attack_ops[split:]), latent, step.labels, targets, settings)
    assert ((points >= latent.lower.unsqueeze(1)) & (points <= latent.upper.unsqueeze(1))).all()


@pytest.mark.parametrize("seed", range(4))
def test_margin_pgd_in_reduced_precision_finds_the_margins_of_full_precision(seed):
    """With bfloat16 iterates, forwards and gradients, the attack gains (over the box centre)
    at least 95% of the margin that the full-precision attack gains, and every point beats the centre."""
    _, step = training_step_inputs(seed=seed)
    split = split_index(step.ops, 1)
    head = tuple(step.attack_ops[split:])
    latent = interval_bounds(step.attack_ops[:split], step.box())[-1]
    targets = torch.stack([(step.labels + shift) % 4 for shift in (1, 2, 3)], dim=1)
    label_and_target = torch.stack([step.labels[:, None].expand_as(targets), targets], dim=2).flatten(0, 1)

    def margins(points):
        return target_margin(run_ops(head, points.flatten(0, 1)), label_and_target)

    found = {precision: margins(margin_pgd(head, latent, step.labels, targets,
                                           PGDSettings(steps=5, restarts=2, precision=precision),
                                           generator=torch.Generator().manual_seed(5)))
             for precision in ("float32", "bfloat16")}
    centre = margins(((latent.lower + latent.upper) / 2).unsqueeze(1).expand(-1, 3, *latent.lower.shape[1:]))
    assert (found["bfloat16"] > centre).all()
    assert (found["bfloat16"] - centre).mean() >= 0.95 * (found["float32"] - centre).mean()


@pytest.mark.parametrize("size, kernel, stride, padding", [(7, 3, 2, 1), (8, 4, 2, 1), (9, 4, 3, 0), (6, 3, 1, 1)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
def test_conv_input_gradient_equals_autograd(size, kernel, stride, padding, memory_format):
    """The hand-written rule of a convolution gives autograd's input gradient, also where the
    stride leaves input rows unread (odd sizes) and in channels-last memory."""
    from ctbench.models.ops import ConvOp
    generator = torch.Generator().manual_seed(size)
    op = ConvOp(torch.randn(5, 3, kernel, kernel, generator=generator, dtype=torch.float64),
                torch.randn(5, generator=generator, dtype=torch.float64), (stride, stride), (padding, padding))
    x = torch.randn(4, 3, size, size, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    x.requires_grad_()
    y = op(x)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    expected = torch.autograd.grad(y, x, grad)[0]
    saved = margin_pgd_module._saved_for_gradient(op, x.detach(), y.detach())
    assert torch.allclose(margin_pgd_module._input_gradient(op, saved, grad), expected, rtol=0, atol=1e-12)

