"""Branch and bound and the MILP on DAG networks (residual connections, concatenations).

Each DAG model is checked against properties that do not trust either verifier: the two agree
on every case; a certified sample survives dense sampling and PGD; a counterexample lies in the
box and fools the float32 model; the MILP minimum is attained at its minimizer and lies below
every sampled margin; and a DAG whose function a chain also computes (a skip connection through
relu(h) - relu(-h), a concatenation as one wider layer) has the chain's MILP minimum, which
``test_certify`` checks against an enumeration of linear regions. A chain still gets the
verdicts, margins and domain counts it got before the verifiers took DAGs (values recorded from
that code), and the same ones when it is passed as a Graph."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import ctbench
from ctbench.attacks.pgd import PGDSettings, margin_loss, pgd_attack
from ctbench.bounds.box import Box, sample_in_box
from ctbench.certify import BabSettings, BranchAndBound, CertifySettings, certify, check_counterexample
from ctbench.certify import milp
from ctbench.certify.milp import network_milp
from ctbench.certify.soundness import float64_box, float64_ops
from ctbench.models.ops import AddOp, ConcatOp, as_graph, is_dag, lower_network

from helpers import conv_net, random_dag_network, random_inputs

pytest.importorskip("scipy.optimize")

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 3


# ----------------------------------------------------------------------------------------------
# tiny DAGs and the chains that compute the same functions


class ConvResidual(nn.Module):
    """conv -> relu -> conv + skip -> relu -> linear head; input (1, 5, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.inner = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(18, CLASSES)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.inner(h) + h).flatten(1))


class PreActivationSkip(nn.Module):
    """h = fc1(x); head(relu(fc2(relu(h)) + h)): the skip reads the node a ReLU reads, so a
    split of that ReLU also bounds the skip. Input (5,)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, width), nn.Linear(width, width), nn.Linear(width, CLASSES)

    def forward(self, x):
        h = self.fc1(x)
        return self.head(torch.relu(self.fc2(torch.relu(h)) + h))

    def as_chain(self) -> nn.Sequential:
        """The same function as a chain: h = relu(h) - relu(-h), so the skip becomes a second
        block of the first ReLU layer: [W1; -W1] x, then [W2 + I, -I]."""
        width = self.fc1.out_features
        first, second = nn.Linear(5, 2 * width), nn.Linear(2 * width, width)
        with torch.no_grad():
            first.weight.copy_(torch.cat([self.fc1.weight, -self.fc1.weight]))
            first.bias.copy_(torch.cat([self.fc1.bias, -self.fc1.bias]))
            identity = torch.eye(width)
            second.weight.copy_(torch.cat([self.fc2.weight + identity, -identity], dim=1))
            second.bias.copy_(self.fc2.bias)
        return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), self.head).eval()


class TwoBranchConcat(nn.Module):
    """Two ReLU branches of the input concatenated, then linear -> relu -> head. Both branch
    layers come first, so the first ReLU does not read the node right before it. Input (5,)."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(5, width), nn.Linear(5, width)
        self.mix, self.head = nn.Linear(2 * width, 4), nn.Linear(4, CLASSES)

    def forward(self, x):
        left, right = self.left(x), self.right(x)
        return self.head(torch.relu(self.mix(torch.cat([torch.relu(left), torch.relu(right)], dim=1))))

    def as_chain(self) -> nn.Sequential:
        """The same function as a chain: the two branches as one layer."""
        both = nn.Linear(5, 2 * self.left.out_features)
        with torch.no_grad():
            both.weight.copy_(torch.cat([self.left.weight, self.right.weight]))
            both.bias.copy_(torch.cat([self.left.bias, self.right.bias]))
        return nn.Sequential(both, nn.ReLU(), self.mix, nn.ReLU(), self.head).eval()


INPUT_SHAPES = {ConvResidual: (1, 5, 5), PreActivationSkip: (5,), TwoBranchConcat: (5,)}


def initialized(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = 1.5 * parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def case(kind: type, seed: int, **sizes) -> tuple[nn.Module, torch.Tensor, int]:
    """A DAG model (float32), a sample and the class the model gives it."""
    model = initialized(kind(**sizes), seed)
    x = torch.rand(INPUT_SHAPES[kind], generator=torch.Generator().manual_seed(100 + seed))
    return model, x, int(model(x[None]).argmax())


# ----------------------------------------------------------------------------------------------
# verifiers and independent checks


def confirm_with(model, eps):
    def confirm(points, x, label):
        return torch.tensor([check_counterexample(model, x, label, eps, point).valid for point in points])

    return confirm


def run_bab(model, network, x, label, eps, **options):
    settings = BabSettings(**{"timeout": 60, "attack_restarts": 0, **options})
    verifier = BranchAndBound(network, float64_ops(model), settings, confirm=confirm_with(model, eps))
    return verifier.verify(x, label, eps, CLASSES)


def run_milp(model, x, label, eps):
    result = network_milp(float64_ops(model), float64_box(x[None], eps, (0.0, 1.0)), label, CLASSES)
    assert result.exact
    return result


def margins(model: nn.Module, points: torch.Tensor, label: int) -> torch.Tensor:
    """z_label - max_{t != label} z_t at each (float32) point, by the float32 model."""
    with torch.no_grad():
        logits = model(points)
    others = logits.clone()
    others[:, label] = -math.inf
    return logits[:, label] - others.amax(dim=1)


def attacked_margins(model: nn.Module, x: torch.Tensor, label: int, eps: float) -> torch.Tensor:
    """Float32 margins at 4000 sampled points of the box (corners over-represented) and at
    PGD's points (margin loss, 10 restarts)."""
    box = Box((x[None] - eps).clamp(min=0), (x[None] + eps).clamp(max=1))
    generator = torch.Generator().manual_seed(7)
    sampled = sample_in_box(box, 4000, generator).flatten(0, 1)
    attacked = pgd_attack(model, box, torch.tensor([label]), PGDSettings(steps=40, restarts=10),
                          loss_fn=margin_loss, generator=generator)
    return margins(model, torch.cat([sampled, attacked]), label)


def inside_and_misclassified(model: nn.Module, x: torch.Tensor, label: int, eps: float, point: torch.Tensor) -> bool:
    """The float32 point lies in the box (compared in float64) and the float32 model does not
    give it the class ``label``."""
    exact, x64 = point.detach().double(), x.double()
    inside = bool(((exact >= (x64 - eps).clamp(min=0)) & (exact <= (x64 + eps).clamp(max=1))).all())
    with torch.no_grad():
        predicted = int(model(point.float()[None]).argmax())
    return point.dtype == torch.float32 and inside and predicted != label


def check_agreement(model, x, label, eps, bab, exact) -> None:
    """BaB's verdict is the sign of the MILP minimum, and both survive independent checks."""
    assert abs(exact.minimum) > 1e-4, "test case too close to the decision boundary"
    box = float64_box(x[None], eps, (0.0, 1.0))
    point = exact.point[None]
    assert bool(((point >= box.lower - 1e-9) & (point <= box.upper + 1e-9)).all())  # the solver's tolerance
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(point)[0]
    assert float(logits[label] - logits[exact.target]) == pytest.approx(exact.minimum, abs=1e-6)  # attained
    sampled = attacked_margins(model, x, label, eps)
    assert float(sampled.min()) >= exact.minimum - 1e-5  # the MILP minimum is below every margin
    if exact.minimum > 0:
        assert bab.status == "certified", (eps, exact.minimum, bab)
        assert 0 < bab.margin_lower <= exact.minimum + 1e-6
        assert bool((sampled > 0).all())
    else:
        assert bab.status == "falsified", (eps, exact.minimum, bab)
        assert inside_and_misclassified(model, x, label, eps, bab.counterexample)


# ----------------------------------------------------------------------------------------------
# DAGs


@pytest.mark.parametrize("kind", [ConvResidual, PreActivationSkip, TwoBranchConcat])
def test_bab_and_milp_agree_on_dag_networks_and_survive_attacks(kind):
    statuses = []
    for seed in (0, 2):
        model, x, label = case(kind, seed)
        network = lower_network(model, detach=True)
        assert is_dag(network) and any(isinstance(op, (AddOp, ConcatOp)) for op in network.ops)
        at_zero = run_bab(model, network, x, label, 0.0)
        assert at_zero.status == "certified" and at_zero.margin_lower > 0
        for eps in (0.05, 0.15, 0.3):
            bab = run_bab(model, network, x, label, eps)
            check_agreement(model, x, label, eps, bab, run_milp(model, x, label, eps))
            statuses.append(bab.status)
    assert {"certified", "falsified"} <= set(statuses)


# (kind, sizes, seed, eps): DAG cases that the root bound cannot close, so branch and bound splits
# down to LP leaves (without the split multipliers, as in test_certify).
BRANCHING = [(PreActivationSkip, dict(width=6), 7, 0.3), (PreActivationSkip, dict(width=6), 9, 0.3),
             (TwoBranchConcat, {}, 0, 0.2), (TwoBranchConcat, {}, 2, 0.3)]


@pytest.mark.parametrize("kind,sizes,seed,eps", BRANCHING)
def test_bab_splits_dag_relus_down_to_lp_leaves(kind, sizes, seed, eps, monkeypatch):
    model, x, label = case(kind, seed, **sizes)
    network = lower_network(model, detach=True)
    solved = []
    original = milp.solve
    monkeypatch.setattr(milp, "solve", lambda *a, **k: solved.append(1) or original(*a, **k))
    bab = run_bab(model, network, x, label, eps, beta=False, batch_domains=8)
    assert bab.domains > CLASSES - 1 and solved  # it branched and closed LP leaves
    exact = run_milp(model, x, label, eps)
    check_agreement(model, x, label, eps, bab, exact)
    for options in (dict(domain_intermediate="crown"), dict(intermediate="ibp", root_alpha_iterations=2)):
        again = run_bab(model, network, x, label, eps, batch_domains=8, **options)
        assert again.status == bab.status and again.margin_lower <= exact.minimum + 1e-6


@pytest.mark.parametrize("kind", [PreActivationSkip, TwoBranchConcat])
def test_the_dag_milp_has_the_minimum_of_an_equivalent_chain(kind):
    for seed in (0, 2):
        model, x, label = case(kind, seed)
        chain = model.as_chain()
        points = torch.rand(64, 5, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(chain(points), model(points), atol=1e-5)
        assert isinstance(lower_network(chain), tuple) and is_dag(lower_network(model))
        for eps in (0.1, 0.3):
            dag, reference = run_milp(model, x, label, eps), run_milp(chain, x, label, eps)
            assert dag.per_target.keys() == reference.per_target.keys()
            for target, value in dag.per_target.items():
                assert value == pytest.approx(reference.per_target[target], abs=1e-6)
            assert run_bab(model, lower_network(model, detach=True), x, label, eps).status == \
                run_bab(chain, lower_network(chain, detach=True), x, label, eps).status


def test_maxpooling_is_still_refused_by_both_verifiers():
    network = lower_network(random_dag_network(3, "max", dtype=torch.float32), detach=True)
    with pytest.raises(TypeError, match="branch and bound does not handle MaxPoolOp"):
        BranchAndBound(network, network)
    box = float64_box(random_inputs(4, batch=1), 0.1, (0.0, 1.0))
    with pytest.raises(TypeError, match="the MILP encoding does not handle MaxPoolOp"):
        network_milp(network, box, 0, 4)


# ----------------------------------------------------------------------------------------------
# chains: as before


def dense_chain(seed: int) -> nn.Sequential:
    return initialized(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, CLASSES)),
                       seed)


def chain_case(name: str, seed: int):
    model = conv_net(seed, CLASSES) if name == "conv" else dense_chain(seed)
    x = torch.rand((1, 5, 5) if name == "conv" else (5,), generator=torch.Generator().manual_seed(100 + seed))
    return model, x, int(model(x[None]).argmax())


# (chain, seed, eps) -> (BaB status, its margin_lower, domains, MILP minimum), computed by the
# chain-only verifiers before they took DAGs.
BEFORE = {
    ("dense", 0, 0.4): ("falsified", -0.08508270978927612, 16, -0.08508273135849567),
    ("dense", 2, 0.5): ("certified", 0.013680001275964247, 34, 0.11121613738672674),
    ("dense", 3, 0.5): ("certified", 0.00486566311790848, 66, 0.1328861670184714),
    ("conv", 0, 0.25): ("certified", 0.12381114535573104, 2, 0.12767120028773582),
    ("conv", 1, 0.25): ("falsified", -1.1973848342895508, 2, -1.2274108187460655),
}


@pytest.mark.parametrize("name,seed,eps", sorted(BEFORE))
def test_a_chain_gets_the_verdicts_it_got_before_and_the_same_as_a_graph(name, seed, eps):
    status, margin, domains, minimum = BEFORE[(name, seed, eps)]
    model, x, label = chain_case(name, seed)
    chain = lower_network(model, detach=True)
    assert isinstance(chain, tuple)
    in_chain_form = run_bab(model, chain, x, label, eps)
    assert (in_chain_form.status, in_chain_form.domains) == (status, domains)
    assert in_chain_form.margin_lower == pytest.approx(margin, rel=1e-4, abs=1e-7)
    in_graph_form = run_bab(model, as_graph(chain), x, label, eps)
    assert (in_graph_form.status, in_graph_form.domains) == (status, domains)
    assert in_graph_form.margin_lower == pytest.approx(in_chain_form.margin_lower, abs=1e-9)
    ops64 = float64_ops(model)
    box = float64_box(x[None], eps, (0.0, 1.0))
    chain_milp = network_milp(ops64, box, label, CLASSES)
    graph_milp = network_milp(as_graph(ops64), box, label, CLASSES)
    assert chain_milp.minimum == pytest.approx(minimum, abs=1e-8)
    assert graph_milp.per_target == pytest.approx(chain_milp.per_target, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# the cascade


def test_the_cascade_runs_milp_and_bab_on_dag_networks(tmp_path):
    model, _, _ = case(PreActivationSkip, 2)
    images = torch.rand(6, 5, generator=torch.Generator().manual_seed(11))
    labels = model(images).argmax(1)
    eps = 0.1
    result = ctbench.certify(model, images, labels, eps, stages="milp,bab", timeout=30,
                             settings=CertifySettings(cross_check=True), out_dir=tmp_path / "run")
    assert [v.index for v in result.verdicts] == list(range(6))
    for verdict in result.verdicts:
        x, label = images[verdict.index], int(labels[verdict.index])
        exact = run_milp(model, x, label, eps).minimum
        assert verdict.verdict == ("certified" if exact > 0 else "falsified"), (verdict, exact)
        if verdict.verdict == "certified":
            assert verdict.stage == "bab" and 0 < verdict.margin_lower <= exact + 1e-6
        else:
            assert verdict.stage in ("milp", "bab")
            assert inside_and_misclassified(model, x, label, eps, torch.tensor(verdict.counterexample))
    assert {v.verdict for v in result.verdicts} == {"certified", "falsified"}
    assert len((tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()) == 6
    # A traced DAG with BatchNorm, Normalize, convolutions, an add, a concatenation and average
    # pooling (too many neurons for the milp stage, which leaves its samples to bab).
    dag = random_dag_network(21, "avg", dtype=torch.float32)
    inputs = random_inputs(22, batch=3).float()
    full = certify(dag, (inputs, dag(inputs).argmax(1)), 0.01, stages="attack,milp,bab", timeout=60,
                   settings=CertifySettings(cross_check=True))
    assert all(v.verdict in ("certified", "falsified") for v in full.verdicts)
    assert "bab" in {v.stage for v in full.verdicts}
