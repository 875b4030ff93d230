"""Rigorous floating-point bounds (``ctbench.certify.rigorous``): a float64 recomputation is not
a proof (an absorbed bias fools it), the rigorous bounds are below the exact real values (by
sampling, and in exact rational arithmetic), they cost next to nothing in tightness, and they
stay sound with splits, slopes and split multipliers; the Lagrangian bounds of LP leaves too."""
from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
from torch import nn

from ctbench.bounds.box import sample_in_box
from ctbench.bounds.crown import crown_bounds, crown_ibp_margin_lower, intermediate_bounds, relu_indices
from ctbench.bounds.ibp import ibp_margin_lower
from ctbench.certify import BabSettings, BranchAndBound, CertifySettings, SafetyMargin, certify, check_counterexample
from ctbench.certify.bab import split_bound
from ctbench.certify.milp import network_milp
from ctbench.certify.rigorous import (
    crown_lower, ibp_lower, interval_network, layer_bounds, point_network, rigorous_box,
)
from ctbench.certify.soundness import (
    clean_logits64, float64_box, float64_ops, infeasibility_certificate, lagrangian_lower_bound, margin_rows,
    min_other,
)
from ctbench.models import InputSpec, Normalize, build_model, initialize
from ctbench.models.ops import lower_network

from helpers import random_inputs, random_network


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# networks


def absorbed_bias_net() -> nn.Sequential:
    """z_0 - z_1 = (2^70 - 50) - 2^70 + 1.05 = -48.95 exactly, on every input; float64 rounds
    2^70 - 50 to 2^70 and finds +1.05."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model[0].bias.fill_(1.0)
        model[2].weight.copy_(torch.diag(torch.tensor([2.0 ** 70, 2.0 ** 70])))
        model[2].bias.copy_(torch.tensor([-50.0, 0.0]))
        model[4].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        model[4].bias.copy_(torch.tensor([1.05, 0.0]))
    return model.eval()


def absorbed_offset_net() -> nn.Sequential:
    """z_0 - z_1 = ((2^70 - 50) + 3 x) - 2^70 = 3 x - 50 exactly; CROWN's float64 constant
    term, accumulated from the last layer, is fl(fl(-2^70 - 50) + 2^70) = 0, so it finds 3 x."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0], [3.0]]))
        model[0].bias.copy_(torch.tensor([2.0 ** 70, 0.0]))
        model[2].weight.copy_(torch.eye(2))
        model[2].bias.copy_(torch.tensor([-50.0, 0.0]))
        model[4].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        model[4].bias.copy_(torch.tensor([-(2.0 ** 70), 0.0]))
    return model.eval()


def dense_net(seed: int, widths=(6, 6), inputs: int = 4, classes: int = 3, extreme: bool = False) -> nn.Sequential:
    """Linear/ReLU layers; ``extreme``: each layer's weights and bias scaled by 10^k, k in
    [-6, 6]."""
    generator = torch.Generator().manual_seed(seed)
    sizes = (inputs, *widths, classes)
    layers: list[nn.Module] = []
    for width_in, width_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for layer in model[::2]:
            scale = 10.0 ** float(torch.randint(-6, 7, (1,), generator=generator)) if extreme else 1.0
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.3 * scale)
    return model.eval()


def conv_bn_net(seed: int, extreme: bool = True) -> nn.Sequential:
    """Normalize, Conv, BatchNorm2d (random population statistics), ReLU, Linear, BatchNorm1d,
    ReLU, Linear; ``extreme``: weights scaled by 10^k, k in [-6, 6], statistics up to 1e3 / 1e5."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 3 if extreme else -1
    model = nn.Sequential(Normalize((0.3,), (0.7,)), nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(27, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                scale = 10.0 ** float(torch.randint(-6, 7, (1,), generator=generator)) if extreme else 0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * scale)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                size = layer.num_features
                layer.running_mean.copy_(torch.randn(size, generator=generator) * 10.0 ** magnitude)
                layer.running_var.copy_(torch.rand(size, generator=generator) * 10.0 ** (2 * magnitude - 1) + 1e-3)
                layer.weight.copy_(torch.randn(size, generator=generator))
                layer.bias.copy_(torch.randn(size, generator=generator))
    return model.eval()


def cnn3_bn(seed: int) -> nn.Sequential:
    """The repo's CNN3-BN for MNIST, IBP init, random population statistics."""
    torch.manual_seed(seed)
    model = build_model("cnn3", InputSpec(1, 28, 10, (0.1307,), (0.3081,)), batch_norm=True)
    initialize(model, "ibp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) * 0.5 + 0.05)
    return model.eval()


def rigorous_rows(model, x, eps, labels, mode, alphas=None):
    """Rigorous lower bounds (B, K-1) of the margin rows: "ibp", "crown-ibp" or "crown"."""
    net = interval_network(model)
    spec = margin_rows(labels, model[-1].out_features, torch.float64)
    crown_layers = relu_indices(net) if mode == "crown" else ()
    bounds = layer_bounds(net, rigorous_box(x, eps, (0.0, 1.0)), crown_layers=crown_layers)
    return ibp_lower(net, bounds, spec) if mode == "ibp" else crown_lower(net, bounds, spec, alphas)


def float64_rows(model, x, eps, labels, mode, alphas=None):
    """The same bounds from the float64 engine (no rounding accounted for)."""
    ops, box = float64_ops(model), float64_box(x, eps, (0.0, 1.0))
    spec = margin_rows(labels, model[-1].out_features, torch.float64)
    if mode == "ibp":
        return ibp_margin_lower(ops, box, labels)[0].gather(1, spec.argmin(dim=2))
    return crown_bounds(ops, box, spec, intermediate_bounds(ops, box, mode), alphas)


def preactivations(ops, points) -> dict[int, torch.Tensor]:
    """The float64 input of every ReLU op at the points, and the logits under key -1."""
    values, current = {}, points.double()
    for index, op in enumerate(ops):
        if index in relu_indices(ops):
            values[index] = current
        current = op(current)
    values[-1] = current
    return values


def random_alphas(model, x, rows: int, seed: int) -> dict[int, torch.Tensor]:
    """Lower slopes in [0, 1], one per ReLU neuron, sample and spec row."""
    generator = torch.Generator().manual_seed(seed)
    pre = preactivations(float64_ops(model), x)
    return {index: torch.rand(x.shape[0], rows, *value.shape[1:], generator=generator, dtype=torch.float64)
            for index, value in pre.items() if index >= 0}


def sampled_margins(model, x, eps, labels, count: int = 400, seed: int = 0) -> torch.Tensor:
    """min over ``count`` sampled points of the float64 margin rows z_y - z_t, shape (B, K-1)."""
    model64 = copy.deepcopy(model).double()
    box = float64_box(x, eps, (0.0, 1.0))
    points = sample_in_box(box, count, torch.Generator().manual_seed(seed))  # (count, B, ...)
    with torch.no_grad():
        logits = model64(points.flatten(0, 1)).view(count, x.shape[0], -1)
    spec = margin_rows(labels, logits.shape[-1], torch.float64)
    return torch.einsum("bsk,nbk->nbs", spec, logits).amin(dim=0)


# ----------------------------------------------------------------------------------------------
# exact rational arithmetic


def exact_logits(model: nn.Sequential, point) -> list[Fraction]:
    """The real network (Linear/ReLU) at a point, in exact rational arithmetic."""
    values = [Fraction(float(v)) for v in point]
    for layer in model:
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight.double().tolist(), layer.bias.double().tolist()
            values = [sum((Fraction(w) * v for w, v in zip(row, values)), Fraction(b)) for row, b in zip(weight, bias)]
        else:
            values = [max(v, Fraction(0)) for v in values]
    return values


def exact_min_margin(model, points, label: int) -> Fraction:
    margins = []
    for point in points:
        logits = exact_logits(model, point)
        margins += [logits[label] - logits[t] for t in range(len(logits)) if t != label]
    return min(margins)


# ----------------------------------------------------------------------------------------------
# the absorbed bias


def old_float64_check(model, x, labels, stage: str) -> torch.Tensor:
    """The former re-check of the ibp / crown-ibp stage: the float64 engine's min margin bound."""
    ops, box = float64_ops(model), float64_box(x, 0.1, (0.0, 1.0))
    if stage == "ibp":
        return min_other(ibp_margin_lower(ops, box, labels)[0], labels)
    return min_other(crown_ibp_margin_lower(ops, box, labels, 2), labels)


@pytest.mark.parametrize("network,stage,claimed,exact", [
    (absorbed_bias_net, "ibp", 1.05, Fraction(torch.tensor(1.05).item()) - 50),  # -48.95 everywhere
    (absorbed_offset_net, "crown-ibp", 1.2, Fraction(3) * Fraction(torch.tensor(0.4, dtype=torch.float64).item()) - 50),
])
def test_float64_recheck_certifies_an_absorbed_bias_the_rigorous_check_does_not(network, stage, claimed, exact):
    model = network()
    x, labels = torch.full((1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    box = float64_box(x, 0.1, (0.0, 1.0))
    assert exact_min_margin(model, [[box.lower.item()], [0.5], [box.upper.item()]], 0) == exact
    old = old_float64_check(model, x, labels, stage)  # passes the safety threshold: the old check certifies
    assert float(old[0]) == pytest.approx(claimed) and bool(old[0] > SafetyMargin().threshold(
        clean_logits64(float64_ops(model), x))[0])
    for mode in ("ibp", "crown-ibp", "crown"):
        bound = float(rigorous_rows(model, x, 0.1, labels, mode).min())
        assert bound <= exact < 0, mode


def test_cascade_does_not_certify_an_absorbed_bias():
    model = absorbed_bias_net()
    x, labels = torch.full((2, 1), 0.5), torch.zeros(2, dtype=torch.long)
    result = certify(model, (x, labels), 0.1, stages="ibp,crown-ibp,attack,alpha-crown,bab",
                     settings=CertifySettings(bab=BabSettings(timeout=5, attack_restarts=1)))
    assert [v.verdict for v in result.verdicts] == ["unknown"] * 2  # the float32 model is never fooled


# ----------------------------------------------------------------------------------------------
# soundness


SOUNDNESS_CASES = [("dense", 0), ("dense", 1), ("extreme", 2), ("extreme", 3), ("extreme", 4), ("conv-bn", 5),
                   ("conv-bn", 6), ("helpers", 7)]


def soundness_case(kind: str, seed: int):
    if kind in ("dense", "extreme"):
        model = dense_net(seed, extreme=kind == "extreme")
        x = torch.rand((3, 4), generator=torch.Generator().manual_seed(seed))
        return model, x, 0.1
    if kind == "conv-bn":
        model = conv_bn_net(seed)
        return model, torch.rand((3, 1, 5, 5), generator=torch.Generator().manual_seed(seed)), 0.05
    return random_network(seed, dtype=torch.float32), random_inputs(seed, 3, torch.float32), 0.02


@pytest.mark.parametrize("kind,seed", SOUNDNESS_CASES)
def test_rigorous_bounds_are_below_sampled_margins_and_float64_bounds(kind, seed):
    model, x, eps = soundness_case(kind, seed)
    labels = model(x).argmax(1)
    sampled = sampled_margins(model, x, eps, labels)
    rows = model[-1].out_features - 1
    alphas = random_alphas(model, x, rows, seed)
    for mode, slopes in (("ibp", None), ("crown-ibp", None), ("crown", None), ("crown", alphas)):
        rigorous = rigorous_rows(model, x, eps, labels, mode, slopes)
        assert (rigorous <= sampled).all(), (kind, mode)
        assert (rigorous <= float64_rows(model, x, eps, labels, mode, slopes)).all(), (kind, mode)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rigorous_bounds_hold_in_exact_rational_arithmetic(seed):
    model = dense_net(seed, widths=(5,), inputs=3, extreme=seed > 0)
    x = torch.rand((1, 3), generator=torch.Generator().manual_seed(seed))
    label = int(model(x).argmax(1))
    box = float64_box(x, 0.1, (0.0, 1.0))
    points = sample_in_box(box, 30, torch.Generator().manual_seed(seed))[:, 0].tolist()
    corners = [[box.lower[0, i] if (k >> i) & 1 else box.upper[0, i] for i in range(3)] for k in range(8)]
    exact = exact_min_margin(model, points + corners, label)
    for mode in ("ibp", "crown-ibp", "crown"):
        bound = float(rigorous_rows(model, x, 0.1, torch.tensor([label]), mode).min())
        assert Fraction(bound) <= exact, mode


def test_rigorous_box_contains_the_real_eps_ball():
    x = torch.tensor([[0.3, 0.95, 0.05, 1 / 3]], dtype=torch.float32)
    for eps, real in ((0.1, Fraction(1, 10)), (8 / 255, Fraction(8, 255)), (2 / 255, Fraction(2, 255))):
        box = rigorous_box(x, eps, (0.0, 1.0))
        for value, lower, upper in zip(x[0].tolist(), box.lower[0].tolist(), box.upper[0].tolist()):
            assert Fraction(lower) <= max(Fraction(value) - real, Fraction(0))
            assert Fraction(upper) >= min(Fraction(value) + real, Fraction(1))


def at_most_ratio(a: Fraction, numerator: Fraction, square: Fraction) -> bool:
    """a <= numerator / sqrt(square), exactly (square > 0)."""
    if numerator >= 0:
        return a <= 0 or a * a * square <= numerator * numerator
    return a < 0 and a * a * square >= numerator * numerator


def test_batchnorm_and_normalize_intervals_contain_the_real_parameters():
    """s = gamma / sqrt(var + eps) in [s_lo, s_hi], checked in rationals (s_hi >= s as -s_hi <=
    -gamma / sqrt(...)); the shift interval contains beta - mean s for every s of it."""
    model = conv_bn_net(3)
    net = interval_network(model)
    for layer, op in ((model[2], net[2]), (model[6], net[6])):
        for c in range(layer.num_features):
            gamma, beta = Fraction(layer.weight[c].item()), Fraction(layer.bias[c].item())
            mean = Fraction(layer.running_mean[c].item())
            square = Fraction(layer.running_var[c].item()) + Fraction(layer.eps)
            low, high = Fraction(op.scale.lower[c].item()), Fraction(op.scale.upper[c].item())
            assert at_most_ratio(low, gamma, square) and at_most_ratio(-high, -gamma, square)
            ends = sorted([beta - mean * low, beta - mean * high])
            assert Fraction(op.shift.lower[c].item()) <= ends[0] and ends[1] <= Fraction(op.shift.upper[c].item())
    std, mean = Fraction(model[0].std.item()), Fraction(model[0].mean.item())
    scale, shift = net[0].scale, net[0].shift
    assert Fraction(scale.lower.item()) * std <= 1 <= Fraction(scale.upper.item()) * std
    assert Fraction(shift.lower.item()) * std <= -mean <= Fraction(shift.upper.item()) * std


# ----------------------------------------------------------------------------------------------
# tightness


@pytest.mark.parametrize("kind,seed", [("helpers", 0), ("helpers", 1), ("dense", 2), ("cnn3", 3)])
def test_rigorous_bounds_are_within_1e9_of_float64_on_ordinary_networks(kind, seed):
    if kind == "cnn3":
        model = cnn3_bn(seed)
        x, eps = torch.rand((4, 1, 28, 28), generator=torch.Generator().manual_seed(seed)), 0.01
    elif kind == "dense":
        model, x, eps = dense_net(seed), torch.rand((4, 4), generator=torch.Generator().manual_seed(seed)), 0.05
    else:
        model, x, eps = random_network(seed, dtype=torch.float32), random_inputs(seed, 4, torch.float32), 0.02
    labels = model(x).argmax(1)
    alphas = random_alphas(model, x, model[-1].out_features - 1, seed)
    for mode, slopes in (("ibp", None), ("crown-ibp", None), ("crown", alphas)):
        rigorous = rigorous_rows(model, x, eps, labels, mode, slopes)
        reference = float64_rows(model, x, eps, labels, mode, slopes)
        assert ((reference - rigorous) <= 1e-9 * reference.abs().clamp(min=1.0)).all(), (kind, mode)


# ----------------------------------------------------------------------------------------------
# splits, slopes and split multipliers


def test_split_bound_with_betas_is_below_the_domain_minimum():
    """Splits (the signs of a sampled point, on two unstable neurons per layer), random slopes
    and multipliers: the rigorous bound is below every sampled point of the domain and below
    the float64 ``bab.split_bound``."""
    model = dense_net(11, widths=(8, 8), inputs=3)
    x = torch.rand((1, 3), generator=torch.Generator().manual_seed(11))
    label, eps = int(model(x).argmax(1)), 0.15
    net, ops64 = interval_network(model), float64_ops(model)
    box, box64 = rigorous_box(x, eps, (0.0, 1.0)), float64_box(x, eps, (0.0, 1.0))
    root = layer_bounds(net, box)
    relus = relu_indices(net)
    generator = torch.Generator().manual_seed(0)
    points = sample_in_box(box64, 20000, generator)[:, 0]
    reference = preactivations(ops64, points[:1])
    split = {}
    for index in relus:
        unstable = ((root[index].lower < 0) & (root[index].upper > 0))[0].nonzero().flatten()[:2]
        mask = torch.zeros_like(root[index].lower, dtype=torch.int8)
        mask[0, unstable] = torch.where(reference[index][0, unstable] >= 0, 1, -1).to(torch.int8)
        split[index] = mask
    assert sum(int((mask != 0).sum()) for mask in split.values()) >= 3
    spec = margin_rows(torch.tensor([label]), 3, torch.float64)
    alphas = {i: torch.rand(1, 2, 8, generator=generator, dtype=torch.float64) for i in relus}
    betas = {i: torch.rand(1, 2, 8, generator=generator, dtype=torch.float64) * 3 for i in relus}
    bounds = layer_bounds(net, box, split=split, given={i: root[i] for i in relus})
    rigorous = crown_lower(net, bounds, spec, alphas, betas, split)
    values = preactivations(ops64, points)
    inside = torch.ones(points.shape[0], dtype=torch.bool)
    for index in relus:
        inside &= (values[index] * split[index][0].double() >= 0).all(dim=1)
    assert int(inside.sum()) >= 50
    margins = torch.einsum("sk,nk->ns", spec[0], values[-1][inside]).amin(dim=0)
    assert (rigorous[0] <= margins).all()
    intermediate = intermediate_bounds(ops64, box64, "ibp", split=split)
    assert (rigorous <= split_bound(ops64, box64, spec, intermediate, alphas, betas, split, (3,))[0]).all()
    assert not torch.equal(rigorous, crown_lower(net, bounds, spec, alphas))  # the multipliers enter


def test_bab_on_the_interval_network_agrees_with_milp():
    """Branch and bound proving on the interval network (BatchNorm and Normalize as intervals):
    certified exactly when the MILP minimum is positive, with a margin below it."""
    statuses = []
    for seed in range(3):
        model = conv_bn_net(seed, extreme=False)
        x = torch.rand((1, 5, 5), generator=torch.Generator().manual_seed(seed))
        label = int(model(x[None]).argmax())
        for eps in (0.05, 0.2):
            exact = network_milp(float64_ops(model), float64_box(x[None], eps, (0.0, 1.0)), label, 3).minimum
            if abs(exact) < 1e-3:
                continue

            def confirm(points, center, target):
                return torch.tensor([check_counterexample(model, center, target, eps, p).valid for p in points])

            verifier = BranchAndBound(lower_network(model, detach=True), float64_ops(model),
                                      BabSettings(timeout=60, attack_restarts=0), confirm=confirm,
                                      net=interval_network(model))
            result = verifier.verify(x, label, eps, 3)
            statuses.append(result.status)
            assert result.status == ("certified" if exact > 0 else "falsified"), (seed, eps, exact, result)
            if result.status == "certified":
                assert result.margin_lower <= exact + 1e-9
    assert "certified" in statuses and "falsified" in statuses


def test_point_network_of_float64_ops_matches_the_interval_network_on_dense_nets():
    model = dense_net(4)
    x = torch.rand((2, 4), generator=torch.Generator().manual_seed(4))
    box = rigorous_box(x, 0.1, (0.0, 1.0))
    spec = margin_rows(model(x).argmax(1), 3, torch.float64)
    from_model, from_ops = interval_network(model), point_network(float64_ops(model))
    assert torch.equal(crown_lower(from_model, layer_bounds(from_model, box), spec),
                       crown_lower(from_ops, layer_bounds(from_ops, box), spec))


# ----------------------------------------------------------------------------------------------
# Lagrangian bounds of LP leaves


def exact_lagrangian(g, g0, G, h, lam, lower, upper) -> Fraction:
    coefficients = [Fraction(g[j]) + sum(Fraction(G[i][j]) * Fraction(lam[i]) for i in range(len(lam)))
                    for j in range(len(g))]
    box_min = sum(c * Fraction(lower[j] if c >= 0 else upper[j]) for j, c in enumerate(coefficients))
    return box_min + Fraction(g0) - sum(Fraction(li) * Fraction(hi) for li, hi in zip(lam, h))


def test_lagrangian_bounds_are_rigorous():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        rows, n = 1 + trial % 4, 2 + trial % 5
        scales = 10.0 ** torch.randint(-8, 9, (3,), generator=generator).double()
        G = torch.randn(rows, n, generator=generator, dtype=torch.float64) * scales[0]
        h = torch.randn(rows, generator=generator, dtype=torch.float64) * scales[1]
        g = torch.randn(n, generator=generator, dtype=torch.float64) * scales[2]
        lam = torch.rand(rows, generator=generator, dtype=torch.float64)
        lower = torch.rand(n, generator=generator, dtype=torch.float64) - 1
        upper = lower + torch.rand(n, generator=generator, dtype=torch.float64)
        bound = lagrangian_lower_bound(g, 0.25, G, h, lam, lower, upper)
        exact = exact_lagrangian(g.tolist(), 0.25, G.tolist(), h.tolist(), lam.tolist(), lower.tolist(), upper.tolist())
        assert Fraction(bound) <= exact
        assert float(exact) - bound <= 1e-9 * max(1.0, float(scales.max()) * 10)
    # offset - lambda . h = -1 - 2^60: a plain float64 evaluation rounds it up to -2^60
    G, h = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([2.0 ** 60], dtype=torch.float64)
    lam, lower, upper = (torch.full((1,), value, dtype=torch.float64) for value in (1.0, 0.0, 1.0))
    exact = exact_lagrangian([0.0], -1.0, G.tolist(), h.tolist(), lam.tolist(), [0.0], [1.0])
    assert float(-1.0 - lam @ h) > exact  # the old evaluation
    assert Fraction(lagrangian_lower_bound(torch.zeros(1, dtype=torch.float64), -1.0, G, h, lam, lower, upper)) <= exact
    assert Fraction(infeasibility_certificate(G, h, lam, lower, upper)) <= -(2 ** 60)
