"""General networks: torch.fx lowering to a DAG of ops, and soundness of every bound domain on it
(IBP, CROWN, CROWN-IBP, alpha-CROWN, the rigorous float64 engine) for each new op (add,
concatenation, flatten/view, average and max pooling) on random residual/concat networks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ctbench.bounds import Box, interval_bounds, linf_box, sample_in_box
from ctbench.bounds.crown import (
    alpha_crown, crown_bounds, crown_upper_bounds, intermediate_bounds, maxpool_relaxation, nonlinear_indices,
    pool_windows, relu_indices,
)
from ctbench.bounds.ibp import ibp_margin_lower
from ctbench.certify import CertifySettings, certify
from ctbench.certify.bab import BranchAndBound
from ctbench.certify.rigorous import crown_lower, ibp_lower, interval_network, layer_bounds, rigorous_box
from ctbench.certify.soundness import margin_rows
from ctbench.certify.stages import CertifyInputError
from ctbench.methods.taps import split_index
from ctbench.models.ops import (
    INPUT, AddOp, AvgPoolOp, ConcatOp, FlattenOp, Graph, LinearOp, MaxPoolOp, Node, ReluOp, ReshapeOp, apply_op,
    as_graph, clean_forward, fold_affine, lower_network, node_inputs, run_ops,
)

from helpers import POOLS, random_dag_network, random_inputs, random_network


pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(max_examples=12, deadline=None, database=None)
SAMPLES = 1500
TOLERANCE = 1e-9
CASES = dict(seed=st.integers(0, 10_000), pool=st.sampled_from(sorted(POOLS)), batch_norm=st.booleans(),
             eps=st.floats(0.01, 0.3))


def node_values(network, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every node at x."""
    values: list[torch.Tensor] = []
    for node in as_graph(network).nodes:
        values.append(apply_op(node.op, node_inputs(values, x, node)))
    return values


def sampled(box: Box, seed: int, count: int = SAMPLES) -> torch.Tensor:
    return sample_in_box(box, count, torch.Generator().manual_seed(seed)).flatten(0, 1)


def inside(values: torch.Tensor, bound: Box, count: int = SAMPLES) -> bool:
    per_point = values.view(count, -1, *values.shape[1:])
    return bool((per_point >= bound.lower - TOLERANCE).all() and (per_point <= bound.upper + TOLERANCE).all())


def problem(seed: int, pool: str, batch_norm: bool, eps: float, batch: int = 3):
    model = random_dag_network(seed, pool, batch_norm)
    network = lower_network(model, detach=True)
    box = linf_box(random_inputs(seed + 1, batch=batch), eps)
    return model, network, box


# ----------------------------------------------------------------------------------------------
# Lowering


def test_a_sequential_still_lowers_to_the_chain_of_ops_it_lowered_to_before():
    model = random_network(3)
    chain = lower_network(model)
    assert isinstance(chain, tuple) and [type(op).__name__ for op in chain] == [
        "ChannelAffineOp", "ConvOp", "ChannelAffineOp", "ReluOp", "ConvOp", "ReluOp", "FlattenOp", "LinearOp",
        "ChannelAffineOp", "ReluOp", "LinearOp"]


class ChainModule(nn.Module):
    """The layers of ``random_network`` called from a forward of functions and views."""

    def __init__(self, sequential: nn.Sequential) -> None:
        super().__init__()
        self.layers = sequential

    def forward(self, x):
        layers = self.layers
        h = F.relu(layers[2](layers[1](layers[0](x))))
        h = torch.relu(layers[5](layers[4](h)))
        h = h.view(h.size(0), -1)
        return layers[12](F.relu(layers[10](layers[9](layers[8](h)))))


def test_a_traced_chain_is_the_same_tuple_of_ops_as_its_sequential():
    model = random_network(4)
    traced, plain = lower_network(ChainModule(model)), lower_network(model)
    assert isinstance(traced, tuple) and len(traced) == len(plain)
    for mine, theirs in zip(traced, plain):
        assert type(mine) is type(theirs)
        for name in ("weight", "bias", "scale", "shift"):
            if hasattr(mine, name):
                assert torch.equal(getattr(mine, name), getattr(theirs, name))


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_a_dag_lowers_to_a_graph_that_computes_the_module(pool):
    model = random_dag_network(5, pool)
    graph = lower_network(model)
    assert isinstance(graph, Graph)
    kinds = {type(op) for op in graph.ops}
    assert {AddOp, ConcatOp, FlattenOp, ReshapeOp, POOL_OP[pool]} <= kinds
    assert any(len(node.inputs) == 2 and node.inputs[1] != node.inputs[0] - 1 for node in graph.nodes)
    x = random_inputs(6, batch=5)
    assert torch.allclose(run_ops(graph, x), model(x), atol=1e-12)
    assert torch.allclose(run_ops(fold_affine(graph), x), model(x), atol=1e-12)


POOL_OP = {"avg": AvgPoolOp, "avg-overlap": AvgPoolOp, "max": MaxPoolOp, "max-overlap": MaxPoolOp}


def test_batchnorm_statistics_of_a_dag_are_keyed_by_module_name_and_reused_by_the_lowering():
    model = random_dag_network(7, "avg").train()
    x = random_inputs(8, batch=6)
    logits, stats = clean_forward(model, x)
    assert list(stats.per_layer) == ["norm"]
    assert torch.allclose(logits, model(x), atol=1e-12)
    assert torch.allclose(run_ops(lower_network(model, stats), x), logits, atol=1e-12)
    loss = logits.sum() + run_ops(lower_network(model, stats, fold=True), x).sum()
    loss.backward()
    assert model.stem.weight.grad is not None and model.norm.weight.grad is not None


class Unsupported(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(4, 4)
        self.sigmoid = nn.Sigmoid()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = self.linear(x)
        if self.kind == "function":
            return torch.sigmoid(h)
        if self.kind == "module":
            return self.sigmoid(h)
        if self.kind == "parameter":
            return h * self.scale
        return torch.cat([h, h], dim=0)


@pytest.mark.parametrize("kind,named", [("function", "sigmoid"), ("module", "Sigmoid"), ("parameter", "scale"),
                                         ("concat", "cat")])
def test_an_unsupported_node_is_named_with_the_supported_list(kind, named):
    with pytest.raises(TypeError) as error:
        lower_network(Unsupported(kind))
    message = str(error.value)
    assert named in message and "node" in message
    if kind in ("function", "module"):
        assert "supported modules" in message and "Conv2d" in message and "avg_pool2d" in message


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu, self.linear, self.norm = nn.ReLU(), nn.Linear(3, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        h = self.linear(self.relu(self.linear(self.relu(x))))
        return self.norm(self.norm(h)) if self.training else h


def test_shared_modules_lower_and_a_batchnorm_called_twice_is_refused():
    model = Shared().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert [type(op) for op in lower_network(model)] == [ReluOp, LinearOp, ReluOp, LinearOp]
    assert torch.allclose(run_ops(lower_network(model), x), model(x))
    with pytest.raises(TypeError, match="BatchNorm norm is called twice"):
        lower_network(model.train())


def test_a_graph_refuses_nodes_that_read_later_nodes():
    with pytest.raises(ValueError, match="reads"):
        Graph((Node(ReluOp(), (1,)), Node(ReluOp(), (0,))))


# ----------------------------------------------------------------------------------------------
# IBP


@SETTINGS
@given(**CASES)
def test_ibp_contains_sampled_points_at_every_node(seed, pool, batch_norm, eps):
    model, network, box = problem(seed, pool, batch_norm, eps)
    boxes = interval_bounds(network, box)
    for values, bound in zip(node_values(network, sampled(box, seed)), boxes):
        assert inside(values, bound)


@SETTINGS
@given(**CASES)
def test_ibp_margins_of_a_dag_hold_at_sampled_points(seed, pool, batch_norm, eps):
    model, network, box = problem(seed, pool, batch_norm, eps)
    labels = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(seed))
    margins, boxes = ibp_margin_lower(network, box, labels)
    assert len(boxes) == len(network) - 1
    logits = model(sampled(box, seed)).view(SAMPLES, 3, 4)
    sampled_margins = logits.gather(2, labels.view(1, 3, 1).expand(SAMPLES, 3, 1)) - logits
    assert (sampled_margins >= margins - TOLERANCE).all()


# ----------------------------------------------------------------------------------------------
# CROWN


@SETTINGS
@given(**CASES, mode=st.sampled_from(["crown-ibp", "crown"]))
def test_crown_bounds_of_a_dag_hold_at_sampled_points(seed, pool, batch_norm, eps, mode):
    model, network, box = problem(seed, pool, batch_norm, eps)
    spec = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values = torch.einsum("nbk,bsk->nbs", model(sampled(box, seed)).view(SAMPLES, 3, 4), spec)
    intermediate = intermediate_bounds(network, box, mode)
    assert set(intermediate) == set(nonlinear_indices(network))
    lower = crown_bounds(network, box, spec, intermediate)
    upper = crown_upper_bounds(network, box, spec, intermediate)
    assert (values >= lower - TOLERANCE).all() and (values <= upper + TOLERANCE).all()
    graph = as_graph(network)
    points = node_values(network, sampled(box, seed))
    for index, pre in intermediate.items():
        source = graph.nodes[index].inputs[0]
        assert inside(points[source], pre)


@SETTINGS
@given(**CASES)
def test_crown_with_random_slopes_and_alpha_crown_hold_on_a_dag(seed, pool, batch_norm, eps):
    model, network, box = problem(seed, pool, batch_norm, eps)
    generator = torch.Generator().manual_seed(seed)
    spec = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64)
    values = torch.einsum("nbk,bsk->nbs", model(sampled(box, seed)).view(SAMPLES, 3, 4), spec)
    intermediate = intermediate_bounds(network, box, "crown-ibp")
    alphas = {index: torch.rand(3, 4, *intermediate[index].lower.shape[1:], generator=generator, dtype=torch.float64)
              for index in relu_indices(network)}
    assert (values >= crown_bounds(network, box, spec, intermediate, alphas) - TOLERANCE).all()
    result = alpha_crown(network, box, spec, intermediate, iterations=5)
    assert set(result.alphas) == set(relu_indices(network))
    assert (values >= result.lower - TOLERANCE).all()
    assert (result.lower >= crown_bounds(network, box, spec, intermediate) - 1e-9).all()


@pytest.mark.parametrize("pool", ["avg", "avg-overlap"])
def test_crown_is_exact_on_a_linear_dag(pool):
    """Without ReLUs (and with average pooling) the network is affine and CROWN is exact:
    its bound equals min over the box of c . (M x + b) = c M center - |c M| radius + c b."""

    class LinearDag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.pool = nn.Conv2d(2, 3, 3, 1, 1), nn.Conv2d(3, 3, 1), POOLS[pool]()
            self.head = nn.Linear(6 * 16, 3)

        def forward(self, x):
            h = self.a(x)
            h = torch.cat([self.b(h) + h, h], dim=1)
            return self.head(self.pool(h).flatten(1))

    torch.manual_seed(0)
    model = LinearDag().double().eval()
    network = lower_network(model)
    box = linf_box(random_inputs(9, batch=2), 0.1)
    spec = torch.randn(2, 4, 3, dtype=torch.float64)
    basis = torch.cat([torch.zeros(1, 128, dtype=torch.float64), torch.eye(128, dtype=torch.float64)]).view(-1, 2, 8, 8)
    outputs = model(basis)
    matrix, offset = (outputs[1:] - outputs[0]).T, outputs[0]
    rows = torch.einsum("bsk,kn->bsn", spec, matrix)
    exact = (torch.einsum("bsn,bn->bs", rows, box.center.flatten(1))
             - torch.einsum("bsn,bn->bs", rows.abs(), box.radius.flatten(1)) + spec @ offset)
    assert torch.allclose(crown_bounds(network, box, spec), exact, atol=1e-10)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from([(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)]))
def test_maxpool_lines_bound_the_max_at_sampled_points(seed, kernel):
    """h_{i*} <= maxpool(h) everywhere; maxpool(h) <= h_{i*} where i* dominates, else <= max u."""
    size, stride, padding = kernel
    op = MaxPoolOp((size, size), (stride, stride), (padding, padding))
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64)
    scale = torch.rand(1, generator=generator).item()
    radius = torch.rand(2, 3, 5, 5, generator=generator, dtype=torch.float64) * scale
    box = Box.from_center_radius(center, radius)
    relax = maxpool_relaxation(op, box)
    points = sample_in_box(box, 300, generator).flatten(0, 1)
    pooled = op(points)
    choice = relax.choice.repeat(300, 1, 1, 1, 1)[:, 0]
    chosen = torch.where(choice > 0, pool_windows(op, points), 0.0).sum(2).view_as(pooled)
    dominated = relax.dominated.repeat(300, 1, 1, 1, 1)[:, 0]
    upper_line = torch.where(dominated > 0, chosen, relax.upper.repeat(300, 1, 1, 1, 1)[:, 0])
    assert (chosen <= pooled + TOLERANCE).all() and (pooled <= upper_line + TOLERANCE).all()
    assert (relax.choice.sum(3) == 1).all()


# ----------------------------------------------------------------------------------------------
# The rigorous engine


@SETTINGS
@given(**CASES, crown=st.booleans())
def test_rigorous_bounds_of_a_dag_are_below_sampled_float64_margins_and_close_to_float64(
        seed, pool, batch_norm, eps, crown):
    model, network, box = problem(seed, pool, batch_norm, eps)
    x = random_inputs(seed + 1, batch=3).float()
    labels = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(seed))
    net = interval_network(model)
    assert isinstance(net, Graph) and len(net) == len(network)
    real_box = rigorous_box(x, eps, (0.0, 1.0))
    layers = nonlinear_indices(net) if crown else ()
    bounds = layer_bounds(net, real_box, crown_layers=layers)
    spec = margin_rows(labels, 4, torch.float64)
    rigorous_crown, rigorous_ibp = crown_lower(net, bounds, spec), ibp_lower(net, bounds, spec)
    logits = model(sampled(real_box, seed)).view(SAMPLES, 3, 4)
    margins = torch.einsum("nbk,bsk->nbs", logits, spec)
    assert (margins >= rigorous_crown - 0.0).all() and (margins >= rigorous_ibp - 0.0).all()
    # float64 CROWN on the same intermediate boxes (a max pool's lines jump where two lower
    # bounds of a window nearly tie, so boxes that differ by rounding could choose other lines)
    same_boxes = {index: bounds[index] for index in nonlinear_indices(net)}
    float_crown = crown_bounds(network, linf_box(x.double(), eps), spec, same_boxes)
    assert (rigorous_crown <= float_crown + 1e-9).all()
    assert torch.allclose(rigorous_crown, float_crown, rtol=1e-6, atol=1e-6)


def test_rigorous_crown_with_optimized_slopes_holds_on_a_dag():
    model, network, box = problem(11, "max-overlap", True, 0.1)
    x = random_inputs(12, batch=3).float()
    labels = torch.tensor([0, 1, 2])
    spec = margin_rows(labels, 4, torch.float64)
    result = alpha_crown(network, linf_box(x.double(), 0.1), spec, iterations=10)
    net = interval_network(model)
    real_box = rigorous_box(x, 0.1, (0.0, 1.0))
    lower = crown_lower(net, layer_bounds(net, real_box), spec, result.alphas)
    margins = torch.einsum("nbk,bsk->nbs", model(sampled(real_box, 12)).view(SAMPLES, 3, 4), spec)
    assert (margins >= lower).all()
    assert torch.allclose(lower, result.lower, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# What needs a chain, or no max pooling (branch and bound and the MILP on DAGs:
# test_complete_verifiers_dag)


def test_taps_refuses_a_dag():
    network = lower_network(random_dag_network(13, "avg"), detach=True)
    with pytest.raises(ValueError, match="DAG"):
        split_index(network, 1)


def test_branch_and_bound_refuses_max_pooling_in_a_chain():
    chain = (MaxPoolOp((2, 2), (2, 2), (0, 0)), FlattenOp(), LinearOp(torch.randn(3, 4), None))
    with pytest.raises(TypeError, match="MaxPoolOp"):
        BranchAndBound(chain, chain)


def test_the_cascade_refuses_bab_on_a_dag_with_max_pooling_before_writing_and_certifies_it_without(tmp_path):
    model = random_dag_network(15, "max", dtype=torch.float32)
    images = random_inputs(16, batch=6).float()
    labels = model(images).argmax(1)
    with pytest.raises(CertifyInputError, match="bab.*MaxPoolOp.*--stages ibp,crown-ibp,attack,alpha-crown"):
        certify(model, (images, labels), 0.002, out_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # cross_check: every certified sample is attacked too (a SoundnessError if one falls)
    result = certify(model, (images, labels), 0.002, stages="ibp,crown-ibp,attack,alpha-crown", timeout=30,
                     settings=CertifySettings(cross_check=True), out_dir=tmp_path / "run")
    assert result.summary["counts"]["wrong"] == 0
    assert {"ibp", "crown-ibp", "alpha-crown"} <= set(result.summary["certified_by_stage"])
    alpha_only = certify(model, (images, labels), 0.002, stages="alpha-crown", timeout=30,
                         settings=CertifySettings(cross_check=True))
    assert alpha_only.summary["counts"]["certified"] >= result.summary["counts"]["certified"]


def test_chain_and_graph_bounds_agree_on_a_chain_viewed_as_a_graph():
    model = random_network(17)
    chain = lower_network(model)
    graph = as_graph(chain)
    box = linf_box(random_inputs(18), 0.1)
    spec = torch.randn(3, 4, 5, dtype=torch.float64)
    for mode in ("crown-ibp", "crown"):
        assert torch.equal(crown_bounds(chain, box, spec, mode=mode), crown_bounds(graph, box, spec, mode=mode))
    assert all(torch.equal(a.lower, b.lower) for a, b in zip(interval_bounds(chain, box), interval_bounds(graph, box)))
    assert node_inputs([1, 2], 0, graph.nodes[0]) == [0] and graph.nodes[0].inputs == (INPUT,)


class ThreeReads(nn.Module):
    """Three ReLUs of the input, concatenated: on x in [1, 2] every path back to x is exact."""

    def forward(self, x):
        return torch.cat([F.relu(x), torch.relu(x), x.relu()], dim=1)


def test_rigorous_crown_accounts_for_the_rounding_of_summed_branch_coefficients():
    """The spec 2^70 z_0 - z_1 - 2^70 z_2 is -x; summing the coefficients the three branches
    pass back to x in float absorbs the -1 (2^70 - 1 rounds to 2^70) and finds 0 x, which
    float64 CROWN reports as the minimum; the rigorous sum pays for its rounding."""
    network = lower_network(ThreeReads())
    box = Box(torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64))
    spec = torch.tensor([[[2.0 ** 70, -1.0, -(2.0 ** 70)]]], dtype=torch.float64)
    assert crown_bounds(network, box, spec).item() == 0.0  # above the true minimum -2
    assert crown_lower(network, layer_bounds(network, box), spec).item() <= -2.0
