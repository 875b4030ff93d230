import pytest
import torch

from ctbench.attacks import PGDSettings, cross_entropy_loss, margin_loss, pgd_attack
from ctbench.bounds import linf_box


def linear_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_pgd_stays_in_the_box_and_finds_the_worst_corner_of_a_linear_model(precision):
    model = linear_model()
    x = torch.rand(5, 1, 3, 4) * 0.6 + 0.2
    y = torch.randint(0, 3, (5,))
    box = linf_box(x, 0.1)
    point = pgd_attack(model, box, y, PGDSettings(steps=20, restarts=2, precision=precision), loss_fn=margin_loss)
    assert box.contains(point).all()
    # for a linear model the margin to a fixed wrong class is maximized at a corner;
    # the best over wrong classes is the max over classes of the per-class corner value
    weight = model[1].weight.detach()
    best = []
    for i in range(5):
        values = []
        for j in range(3):
            if j == y[i]:
                continue
            direction = (weight[j] - weight[y[i]]).sign().view(1, 3, 4)
            corner = torch.where(direction > 0, box.upper[i], box.lower[i])
            logits = model(corner.unsqueeze(0))[0]
            values.append((logits[j] - logits[y[i]]).item())
        best.append(max(values))
    found = margin_loss(model(point), y)
    tolerance = 1e-5 if precision == "float32" else 5e-2
    assert torch.allclose(found, torch.tensor(best), atol=tolerance)


def test_pgd_keeps_the_highest_loss_point_seen():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.rand(8, 1, 3, 4)
    y = torch.randint(0, 3, (8,))
    box = linf_box(x, 0.3)
    start = box.center
    point = pgd_attack(model, box, y, PGDSettings(steps=5, restarts=1, random_start="center"))
    assert (cross_entropy_loss(model(point), y) >= cross_entropy_loss(model(start), y) - 1e-6).all()
    # zero steps returns the start itself
    assert torch.equal(pgd_attack(model, box, y, PGDSettings(steps=0, restarts=1, random_start="center")), start)


def test_restarts_never_do_worse_than_one_restart_from_the_same_stream():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 3, 4), torch.randint(0, 3, (8,))
    box = linf_box(x, 0.3)
    one = pgd_attack(model, box, y, PGDSettings(steps=3, restarts=1), generator=torch.Generator().manual_seed(0))
    many = pgd_attack(model, box, y, PGDSettings(steps=3, restarts=4), generator=torch.Generator().manual_seed(0))
    # the first restart of `many` draws the same start as `one`
    assert (cross_entropy_loss(model(many), y) >= cross_entropy_loss(model(one), y) - 1e-6).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_in_place_restarts_equal_a_plain_pgd_loop(channels_last):
    """The restarts share one broadcast box and step in place; from the box centre every restart
    must follow exactly the path of a plain, out-of-place PGD on its own sample's box."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 5 * 5, 3))
    x, y = torch.rand(6, 2, 5, 5), torch.randint(0, 3, (6,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    box = linf_box(x, 0.2)
    settings = PGDSettings(steps=6, restarts=3, random_start="center")
    found = pgd_attack(model, box, y, settings)

    point, best, best_loss = box.center, box.center, torch.full((6,), float("-inf"))
    sizes = [0.25] * 3 + [0.125] * 2 + [0.0625]  # step_size 0.25, halved from step 3 (50%) and 4.5 (75%) on
    for size in sizes + [None]:
        point = point.detach().requires_grad_(True)
        loss = cross_entropy_loss(model(point), y)
        better = loss.detach() > best_loss
        best = torch.where(better.view(-1, 1, 1, 1), point.detach(), best)
        best_loss = torch.maximum(best_loss, loss.detach())
        if size is None:
            break
        gradient = torch.autograd.grad(loss.sum(), point)[0]
        point = torch.clamp(point.detach() + size * (box.upper - box.lower) * gradient.sign(), box.lower, box.upper)
    assert torch.allclose(found, best, atol=1e-6)
    assert box.contains(found).all()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="restarts"):
        PGDSettings(restarts=0)
    with pytest.raises(ValueError, match="precision"):
        PGDSettings(precision="int8")


def _first_logit(logits, labels):
    """A loss linear in the input of a linear model: its gradient sign never changes."""
    return logits[:, 0]


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_reference_steps_are_a_constant_fraction_of_the_half_width(steps):
    model = linear_model()
    x = torch.rand(4, 1, 3, 4) * 0.6 + 0.2  # inside [eps, 1 - eps]: the half-width is eps everywhere
    box = linf_box(x, 0.1)
    settings = PGDSettings(steps=steps, restarts=1, step_size=0.25, step_relative_to="half_width",
                           step_schedule="constant", random_start="center")
    point = pgd_attack(model, box, torch.zeros(4, dtype=torch.long), settings, loss_fn=_first_logit)
    direction = model[1].weight.detach()[0].sign().view(1, 1, 3, 4)
    assert torch.allclose(point - x, steps * 0.25 * 0.1 * direction, atol=1e-6)


def test_ctbench_steps_are_a_decaying_fraction_of_the_width():
    model = linear_model()
    x = torch.rand(4, 1, 3, 4) * 0.6 + 0.2
    box = linf_box(x, 0.1)
    settings = PGDSettings(steps=4, restarts=1, step_size=0.125, step_relative_to="width", step_schedule="decay",
                           step_decay=0.5, decay_at=(0.5,), random_start="center")
    point = pgd_attack(model, box, torch.zeros(4, dtype=torch.long), settings, loss_fn=_first_logit)
    direction = model[1].weight.detach()[0].sign().view(1, 1, 3, 4)
    travelled = (2 * 0.125 + 2 * 0.0625) * 0.2  # two full steps, then two halved ones, of the width 0.2
    assert torch.allclose(point - x, travelled * direction, atol=1e-6)


def test_clamped_noise_start_lies_in_the_box_and_on_the_face_for_pixels_at_the_data_bounds():
    x = torch.full((400, 1, 3, 4), 0.5)
    x[:, 0, 0, 0], x[:, 0, 0, 2] = 0.0, 1.0
    box = linf_box(x, 0.2)
    settings = PGDSettings(steps=0, restarts=1, random_start="clamped_noise")
    start = pgd_attack(linear_model(), box, torch.zeros(400, dtype=torch.long), settings, origin=x)
    assert box.contains(start).all()
    at_zero, inside, at_one = start[:, 0, 0, 0], start[:, 0, 0, 1], start[:, 0, 0, 2]
    # noise of the clamped box's half-width (0.1) around the pixel, then clamped: half land on the face
    assert 0.35 < (at_zero == 0).float().mean() < 0.65 and (at_zero <= 0.1 + 1e-7).all()
    assert 0.35 < (at_one == 1).float().mean() < 0.65 and (at_one >= 0.9 - 1e-7).all()
    assert (inside > 0.3).all() and (inside < 0.7).all() and inside.min() < 0.32 and inside.max() > 0.68
    uniform = pgd_attack(linear_model(), box, torch.zeros(400, dtype=torch.long),
                         PGDSettings(steps=0, restarts=1, random_start="uniform"))
    assert (uniform[:, 0, 0, 0] > 0).float().mean() > 0.99  # uniform in the box: (almost) never on a face


def test_unknown_step_semantics_are_rejected():
    with pytest.raises(ValueError, match="step_relative_to"):
        PGDSettings(step_relative_to="quarter_width")
    with pytest.raises(ValueError, match="random_start"):
        PGDSettings(random_start=True)


def test_auto_precision_is_bfloat16_exactly_where_the_cpu_has_fast_bf16(monkeypatch):
    from ctbench.attacks import pgd

    monkeypatch.setattr(pgd, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert pgd.resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(pgd, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert pgd.resolve_precision("auto", "cpu") == "float32"
    assert pgd.resolve_precision("bfloat16", "cpu") == "bfloat16"  # an explicit choice is kept
