"""Property-based tests (hypothesis) of the promise "certified means robust".

Networks are generated: dense and conv, with and without BatchNorm (random statistics), odd
layer orders (BatchNorm after the ReLU, two linear layers in a row, a ReLU on the input, a
network ending in BatchNorm), per-layer weight scales from 1e-3 to 1e3. Boxes are generated
too: eps 0, small, large, the whole domain, inputs with pixels exactly at 0 and 1. The cascade
runs its bound stages only (no attack stage, so nothing but the bounds can certify), and every
certified sample is then attacked three ways: dense sampling of the box (and its corners) in
float64, a strong PGD, and, on networks small and well scaled enough, an exact MILP. None may
find a point where the margin is <= 0.

Resume and merge are generated as well: a certification split into shards, one of them
possibly tampered with (another eps, model, settings, data, or no provenance); merge must
refuse exactly the tampered cases and otherwise equal a single run.

The default profile keeps CI fast; ``CTBENCH_HYPOTHESIS_PROFILE=thorough`` runs many more
examples."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from ctbench.attacks.pgd import PGDSettings, margin_loss, pgd_attack  # noqa: E402
from ctbench.bounds.box import Box  # noqa: E402
from ctbench.certify import (  # noqa: E402
    AttackSettings, BabSettings, CertifySettings, ProvenanceMismatch, certify, merge,
)
from ctbench.certify.milp import network_milp, network_neurons  # noqa: E402
from ctbench.certify.soundness import float64_box, float64_ops  # noqa: E402
from ctbench.certify.stages import AlphaCrownSettings  # noqa: E402
from ctbench.models import Normalize  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("CTBENCH_HYPOTHESIS_PROFILE", "ci"))

BOUND_STAGES = CertifySettings(stages=("ibp", "crown-ibp", "alpha-crown", "bab"), batch_size=8, timeout=0.5,
                               alpha=AlphaCrownSettings(iterations=8), bab=BabSettings(timeout=0.5, attack_restarts=1))
CLASSES = 3

# (name, input shape, layer recipe): "L<n>" Linear to n units, "C<n>s<stride>" 3x3 conv, "B" BatchNorm,
# "R" ReLU, "F" Flatten, "N" Normalize, "I" Identity; the last Linear has CLASSES outputs.
ARCHITECTURES = [
    ("dense", (5,), "L6 R L6 R L"),
    ("dense-bn", (5,), "L6 B R L5 B R L"),
    ("bn-after-relu", (5,), "L6 R B L6 R B L"),
    ("two-linears-in-a-row", (4,), "L6 L6 R L"),
    ("relu-on-the-input", (4,), "R L6 R L"),
    ("ends-in-batchnorm", (4,), "L6 R L B"),
    ("conv", (1, 5, 5), "N C3s1 B R C2s2 R F L"),
    ("conv-odd", (2, 4, 4), "C3s2 R B I F L5 R L"),
]


def build(recipe: str, input_shape: tuple[int, ...], scales: list[float], seed: int) -> nn.Sequential:
    """The network of a recipe, weights ~ N(0, 1/fan_in) times the layer's scale, BatchNorm
    with random affine parameters and statistics (population statistics in eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    shape = list(input_shape)
    tokens = recipe.split()
    scale_of = iter(itertools.cycle(scales))
    for token in tokens:
        if token.startswith("L"):
            outputs = CLASSES if token == "L" else int(token[1:])
            layers.append(nn.Linear(shape[0], outputs))
            shape = [outputs]
        elif token.startswith("C"):
            channels, stride = (int(part) for part in token[1:].split("s"))
            layers.append(nn.Conv2d(shape[0], channels, 3, stride=stride, padding=1))
            shape = [channels, (shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1]
        elif token == "B":
            layers.append(nn.BatchNorm1d(shape[0]) if len(shape) == 1 else nn.BatchNorm2d(shape[0]))
        elif token == "R":
            layers.append(nn.ReLU())
        elif token == "F":
            layers.append(nn.Flatten())
            shape = [shape[0] * shape[1] * shape[2]]
        elif token == "N":
            layers.append(Normalize((0.3,) * shape[0], (0.4,) * shape[0]))
        elif token == "I":
            layers.append(nn.Identity())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                scale = next(scale_of)
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale * 2 / fan_in ** 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * scale * 0.3)
            elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.3)
                layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.5)
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) * 2 + 0.05)
    return model.eval()


@st.composite
def certification_cases(draw):
    name, input_shape, recipe = draw(st.sampled_from(ARCHITECTURES))
    scales = draw(st.lists(st.sampled_from([1e-3, 1.0, 1.0, 1e3]), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2 ** 16))
    eps = draw(st.sampled_from([0.0, 1e-3, 0.02, 0.1, 0.3, 1.0]))
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((4, *input_shape), generator=generator)
    edge = torch.rand(x.shape, generator=generator)
    x = torch.where(edge < 0.15, 0.0, torch.where(edge > 0.85, 1.0, x))  # pixels exactly at 0 and 1
    return name, build(recipe, input_shape, scales, seed), x, eps, max(scales)


def sampled_margins(model64: nn.Module, box: Box, label: int, count: int, generator) -> torch.Tensor:
    """z_y - max_{i != y} z_i (float64) at uniform points, the box's corners (all, or a sample
    for large boxes), the centre and the faces."""
    lower, upper = box.lower[0], box.upper[0]
    dims = lower.numel()
    uniform = lower + (upper - lower) * torch.rand((count, *lower.shape), generator=generator, dtype=torch.float64)
    if dims <= 10:
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=dims)), dtype=torch.float64)
    else:
        corners = (torch.rand((512, dims), generator=generator, dtype=torch.float64) < 0.5).double()
    corners = lower.flatten() + (upper - lower).flatten() * corners
    points = torch.cat([uniform, corners.view(-1, *lower.shape), ((lower + upper) / 2)[None]])
    with torch.no_grad():
        logits = model64(points)
    others = logits.clone()
    others[:, label] = -torch.inf
    return logits[:, label] - others.amax(1)


@given(certification_cases())
def test_no_certified_sample_is_falsified_by_sampling_pgd_or_milp(case):
    name, model, x, eps, scale = case
    labels = model(x).argmax(1)
    result = certify(model, (x, labels), eps, settings=BOUND_STAGES)
    model64 = __import__("copy").deepcopy(model).double().eval()
    generator = torch.Generator().manual_seed(0)
    ops64 = float64_ops(model)
    for verdict in result.verdicts:
        if not verdict.certified:
            continue
        xi, label = x[verdict.index][None], int(labels[verdict.index])
        box = float64_box(xi, eps, (0.0, 1.0))
        assert sampled_margins(model64, box, label, 1000, generator).min() > 0, (name, verdict)
        point = pgd_attack(lambda z: model64(z), box, torch.tensor([label]),
                           PGDSettings(steps=50, restarts=3, step_size=0.1), loss_fn=margin_loss,
                           generator=torch.Generator().manual_seed(verdict.index))
        with torch.no_grad():
            assert int(model64(point).argmax(1)) == label, (name, verdict)
        if scale <= 1.0 and network_neurons(ops64, tuple(xi.shape[1:])) <= 64:
            exact = network_milp(ops64, box, label, CLASSES)
            assert not exact.exact or exact.minimum > -1e-7, (name, verdict, exact.minimum)


# ----------------------------------------------------------------------------------------------
# resume and merge


TAMPERINGS = ["none", "eps", "model", "settings", "data", "no-provenance"]
FAST = CertifySettings(stages=("ibp", "crown-ibp", "attack"), batch_size=4,
                       attack=AttackSettings(pgd_steps=5, pgd_restarts=1))


def tampered_run(kind: str, model, x, labels, eps):
    """What a wrong shard would have been certified with."""
    if kind == "eps":
        return model, x, labels, eps * 1.5, FAST
    if kind == "model":
        other = __import__("copy").deepcopy(model)
        with torch.no_grad():
            next(other.parameters()).mul_(1.01)
        return other, x, labels, eps, FAST
    if kind == "settings":
        return model, x, labels, eps, dataclasses.replace(FAST, timeout=7.0)
    if kind == "data":
        return model, x.flip(0), labels.flip(0), eps, FAST
    return model, x, labels, eps, FAST


@given(shards=st.integers(1, 4), tampered=st.integers(0, 3), kind=st.sampled_from(TAMPERINGS),
       seed=st.integers(0, 1000))
def test_merge_refuses_exactly_the_inconsistent_shards(shards, tampered, kind, seed):
    model = build("L6 R L", (4,), [1.0], seed)
    x = torch.rand((9, 4), generator=torch.Generator().manual_seed(seed))
    labels = model(x).argmax(1)
    eps = 0.05
    tampered %= shards
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for k in range(shards):
            run = tampered_run(kind, model, x, labels, eps) if k == tampered else (model, x, labels, eps, FAST)
            certify(run[0], (run[1], run[2]), run[3], out_dir=folder / f"shard{k}", settings=run[4],
                    shard=f"{k}/{shards}")
            (folder / f"shard{k}" / f"verdicts-shard-{k}-of-{shards}.jsonl").rename(
                folder / f"verdicts-shard-{k}-of-{shards}.jsonl")
            (folder / f"shard{k}" / f"summary-shard-{k}-of-{shards}.json").rename(
                folder / f"summary-shard-{k}-of-{shards}.json")
        if kind == "no-provenance":
            path = folder / f"verdicts-shard-{tampered}-of-{shards}.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()]
            records[-1].pop("provenance")
            path.write_text("".join(json.dumps(record) + "\n" for record in records))
        inconsistent = kind != "none" and (shards > 1 or kind == "no-provenance")
        if inconsistent:
            with pytest.raises(ProvenanceMismatch):
                merge(folder, write=False)
            return
        merged = merge(folder, write=False)
        run = tampered_run(kind, model, x, labels, eps)  # with one shard, the tampered run is the whole run
        single = certify(run[0], (run[1], run[2]), run[3], settings=run[4])
        assert merged.summary["complete"]
        assert [(v.index, v.verdict) for v in merged.verdicts] == [(v.index, v.verdict) for v in single.verdicts]
