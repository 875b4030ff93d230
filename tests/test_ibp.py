import torch
from hypothesis import given, settings, strategies as st

from ctbench.bounds import Box, IBPOptions, ibp_margin_lower, interval_bounds, is_certified, linf_box, sample_in_box
from ctbench.bounds.ibp import elided_margin_lower, margin_lower_from_logits
from ctbench.models.ops import clean_forward, lower_network, run_ops
from helpers import random_inputs, random_network


def _points_inside(ops, box, boxes, count=400, seed=0):
    points = sample_in_box(box, count, torch.Generator().manual_seed(seed))
    flat = points.flatten(0, 1)
    x = flat
    for op, bound in zip(ops, boxes):
        x = op(x)
        per_point = x.view(count, -1, *x.shape[1:])
        assert (per_point >= bound.lower - 1e-9).all() and (per_point <= bound.upper + 1e-9).all(), type(op).__name__
    return x


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.5), stats=st.sampled_from(["running", "batch"]))
def test_ibp_contains_sampled_points(seed, eps, stats):
    model = random_network(seed)
    x = random_inputs(seed + 1)
    bn_stats = clean_forward(model, random_inputs(seed + 2, batch=6))[1] if stats == "batch" else None
    ops = lower_network(model, bn_stats)
    box = linf_box(x, eps)
    _points_inside(ops, box, interval_bounds(ops, box), seed=seed)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.4))
def test_elided_margins_are_sound_and_never_looser_than_logit_bounds(seed, eps):
    model = random_network(seed)
    x = random_inputs(seed + 1, batch=4)
    labels = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(seed))
    ops = lower_network(model)
    box = linf_box(x, eps)
    elided, _ = ibp_margin_lower(ops, box, labels)
    from_logits = margin_lower_from_logits(interval_bounds(ops, box)[-1], labels)
    assert (elided >= from_logits - 1e-9).all()
    points = sample_in_box(box, 500, torch.Generator().manual_seed(seed)).flatten(0, 1)
    logits = run_ops(ops, points).view(500, 4, 5)
    margins = logits.gather(2, labels.view(1, 4, 1).expand(500, 4, 1)) - logits
    assert (margins >= elided.unsqueeze(0) - 1e-9).all()
    assert (elided.gather(1, labels[:, None]) == 0).all()


def test_elision_agrees_between_pair_and_per_sample_forms():
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(6, 9, generator=generator, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    from ctbench.models.ops import LinearOp

    box = Box.from_center_radius(torch.randn(8, 9, dtype=torch.float64), torch.rand(8, 9, dtype=torch.float64))
    labels = torch.randint(0, 6, (8,), generator=generator)
    pair_form = elided_margin_lower(LinearOp(weight, bias), box, labels)  # K=6 <= B=8
    per_sample = elided_margin_lower(LinearOp(weight, bias), Box(box.lower[:4], box.upper[:4]), labels[:4])  # K > B
    assert torch.allclose(pair_form[:4], per_sample)


def test_relu_shrink_only_lowers_unstable_upper_bounds():
    model = random_network(5)
    ops = lower_network(model)
    box = linf_box(random_inputs(6), 0.2)
    plain = interval_bounds(ops, box)
    shrunk = interval_bounds(ops[:4], box, IBPOptions(relu_shrink=0.5))
    pre = plain[2]
    unstable = (pre.lower < 0) & (pre.upper > 0)
    assert unstable.any()
    assert torch.allclose(shrunk[3].upper[unstable], 0.5 * plain[3].upper[unstable])
    assert torch.equal(shrunk[3].upper[~unstable], plain[3].upper[~unstable])


def test_zero_eps_bounds_are_the_forward_pass():
    model = random_network(11)
    x = random_inputs(12)
    ops = lower_network(model)
    boxes = interval_bounds(ops, Box(x, x))
    assert torch.allclose(boxes[-1].lower, model(x)) and torch.allclose(boxes[-1].upper, model(x))


def test_certified_means_strictly_positive_margins():
    margins = torch.tensor([[0.0, 1e-3, 2.0], [0.5, 0.0, -1e-7], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    assert is_certified(margins, labels).tolist() == [True, False, False]


def test_folding_batchnorm_changes_neither_outputs_nor_bounds():
    from ctbench.models.ops import ChannelAffineOp, fold_affine

    model = random_network(21)
    x = random_inputs(22)
    ops = lower_network(model)
    folded = fold_affine(ops)
    assert len(folded) < len(ops)
    assert sum(isinstance(op, ChannelAffineOp) for op in folded) == 1  # only the input normalization
    assert torch.allclose(run_ops(folded, x), run_ops(ops, x))
    box = linf_box(x, 0.1)
    assert torch.allclose(interval_bounds(folded, box)[-1].lower, interval_bounds(ops, box)[-1].lower)
    assert torch.allclose(interval_bounds(folded, box)[-1].upper, interval_bounds(ops, box)[-1].upper)


def test_repeated_boxes_hold_the_copies_in_order_and_keep_channels_last():
    lower = torch.rand(3, 4, 5, 5)
    box = Box(lower, lower + 1)
    channels_last = Box(lower.contiguous(memory_format=torch.channels_last),
                        (lower + 1).contiguous(memory_format=torch.channels_last))
    for source, layout in ((box, torch.contiguous_format), (channels_last, torch.channels_last)):
        tiled, interleaved = source.repeat(2), source.repeat(2, interleave=True)
        assert torch.equal(tiled.lower, torch.cat([lower, lower])) and torch.equal(tiled.upper, tiled.lower + 1)
        assert torch.equal(interleaved.lower, lower[[0, 0, 1, 1, 2, 2]])
        assert all(t.is_contiguous(memory_format=layout) for t in (tiled.lower, interleaved.upper))
