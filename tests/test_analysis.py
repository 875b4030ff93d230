"""The section 5 analyses: fragmentation bounds, utilization, shared mistakes, propagation
tightness, corruptions, figures and the ``analyze`` command, on tiny networks and images."""
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import random_inputs, random_network

from ctbench.analysis import (corrupt, corrupted_test_set, corruption_names, crown_ibp_unstable_masks,
                              ibp_unstable_masks, markdown_table, model_utilization, ood_heatmap, poisson_binomial,
                              propagation_tightness, sampled_unstable_masks, shared_mistakes, shared_mistakes_figure,
                              tightness_figure, tightness_rows, two_verifier_table, unstable_neurons,
                              unstable_neurons_figure, utilization_figure)
from ctbench.analysis.fragmentation import crown_ibp_preactivation_boxes, noisy_points
from ctbench.analysis.tightness import margin_rows
from ctbench.analysis.utilization import relu_pre_activations
from ctbench.bounds import linf_box
from ctbench.models.ops import ChannelAffineOp, ConvOp, LinearOp, ReluOp, lower_network


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# Fragmentation


@pytest.mark.parametrize("seed,eps", [(0, 0.05), (1, 0.2), (2, 0.4)])
def test_sampled_instability_never_exceeds_the_bounds_per_neuron(seed, eps):
    ops = lower_network(random_network(seed))
    x = random_inputs(seed, batch=4)
    generator = torch.Generator().manual_seed(seed)
    sampled = sampled_unstable_masks(ops, x, eps, points=50, generator=generator)
    box = linf_box(x, eps)
    ibp = ibp_unstable_masks(ops, box)
    crown_ibp = crown_ibp_unstable_masks(ops, box)
    assert set(sampled) == set(ibp) == set(crown_ibp)
    for index in sampled:
        assert not (sampled[index] & ~crown_ibp[index]).any()
        assert not (crown_ibp[index] & ~ibp[index]).any()
    assert any(m.any() for m in sampled.values())
    one_at_a_time = sampled_unstable_masks(ops, x, eps, 50, torch.Generator().manual_seed(seed), points_per_pass=1)
    assert all(torch.equal(one_at_a_time[i], sampled[i]) for i in sampled)


def test_crown_ibp_preactivation_bounds_contain_sampled_points_and_are_tighter_than_ibp():
    ops = lower_network(random_network(3))
    x = random_inputs(3, batch=3)
    box = linf_box(x, 0.3)
    points = noisy_points(x, 0.3, 64, torch.Generator().manual_seed(0)).flatten(0, 1)
    pre = relu_pre_activations(ops, points)
    crown = crown_ibp_preactivation_boxes(ops, box, max_elements=5000)  # small chunks
    from ctbench.analysis.fragmentation import ibp_preactivation_boxes
    ibp = ibp_preactivation_boxes(ops, box)
    for index, values in pre.items():
        values = values.view(64, 3, *values.shape[1:])
        assert (values >= crown[index].lower - 1e-9).all() and (values <= crown[index].upper + 1e-9).all()
        assert (crown[index].lower >= ibp[index].lower - 1e-12).all()
        assert (crown[index].upper <= ibp[index].upper + 1e-12).all()
    last = max(crown)
    assert (crown[last].upper - crown[last].lower).sum() < (ibp[last].upper - ibp[last].lower).sum()


def test_unstable_neuron_ratios_are_ordered_and_reproducible():
    model = random_network(4)
    x = random_inputs(4, batch=5)
    first = unstable_neurons(model, x, 0.2, generator=torch.Generator().manual_seed(1), batch_size=2)
    again = unstable_neurons(model, x, 0.2, generator=torch.Generator().manual_seed(1), batch_size=2)
    assert first == again
    assert first.sampled_total <= first.crown_ibp_total <= first.ibp_total
    for low, mid, high in zip(first.sampled, first.crown_ibp, first.ibp):
        assert low <= mid + 1e-12 <= high + 2e-12
    assert first.layer_sizes == [4 * 4 * 4, 3 * 4 * 4, 12]
    assert first.ibp[0] == first.crown_ibp[0]  # one affine block: IBP is exact
    none = unstable_neurons(model, x, 0.0, bounds=("ibp",))
    assert none.sampled_total == 0 and none.ibp_total == 0 and none.crown_ibp is None


# ------------------------------------------------------------------------------------------------
# Utilization


def _hand_net():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]))
        model[2].bias.zero_()
    return model


def test_utilization_counts_active_neurons_of_a_hand_built_net():
    x = torch.tensor([[0.5, 0.25], [0.0, 0.0]], dtype=torch.float64)
    # sample 1: layer 1 pre (0.5, 0.25, -0.75) -> 2/3; layer 2 pre (0.75, -0.5) -> 1/2; total 3/5
    # sample 2: every pre-activation is 0, which is not active
    result = model_utilization(_hand_net(), x, batch_size=1)
    assert result.layer_sizes == [3, 2]
    assert result.per_layer == pytest.approx([1 / 3, 1 / 4])
    assert result.total == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------
# Shared mistakes


def test_poisson_binomial_matches_brute_force_enumeration():
    p = [0.9, 0.6, 0.75]
    brute = np.zeros(4)
    for outcome in itertools.product([0, 1], repeat=3):
        brute[sum(outcome)] += np.prod([pi if o else 1 - pi for pi, o in zip(p, outcome)])
    assert poisson_binomial(p) == pytest.approx(brute)
    assert poisson_binomial([0.9, 0.9])[2] == pytest.approx(0.81)


def test_shared_mistakes_histogram_and_expectation():
    rng = np.random.default_rng(0)
    certified = rng.random((3, 200)) < np.array([[0.9], [0.6], [0.75]])
    result = shared_mistakes(certified)
    assert sum(result.observed) == 200 and len(result.observed) == 4
    assert result.observed == np.bincount(certified.sum(0), minlength=4).tolist()
    assert sum(result.expected) == pytest.approx(200)
    assert result.expected == pytest.approx((poisson_binomial(certified.mean(1)) * 200).tolist())
    assert result.expected_rounded == [int(np.floor(v + 0.5)) for v in result.expected]
    pair = two_verifier_table(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    assert pair.labels == ["neither certifies", "one certifies", "both certify"]
    assert pair.observed == [2, 1, 1] and pair.expected == pytest.approx([1.5, 2.0, 0.5])
    table = markdown_table({"eps 0.1": result})
    assert "obs." in table and "exp." in table and table.count("\n") == 4


# ------------------------------------------------------------------------------------------------
# Propagation tightness


def _dense_net(seed):
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                          nn.Linear(5, 3)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        model[3].running_mean.copy_(torch.randn(5, generator=generator, dtype=torch.float64))
        model[3].running_var.copy_(torch.rand(5, generator=generator, dtype=torch.float64) + 0.5)
        model[0].bias.add_(1.0)  # keep some neurons of each layer active
        model[3].bias.add_(1.0)
    return model.eval()


def test_tightness_equals_explicit_dense_products():
    model = _dense_net(0)
    x = torch.rand((6, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    result = propagation_tightness(model, x, labels)
    W1, W2, W3 = model[0].weight, model[2].weight, model[5].weight
    bn = model[3]
    S = torch.diag(bn.weight / torch.sqrt(bn.running_var + bn.eps))
    expected, expected_layer2 = [], []
    with torch.no_grad():
        for xi, y in zip(x, labels):
            h1 = W1 @ xi + model[0].bias
            D1 = torch.diag((h1 > 0).double())
            h2 = model[3](model[2](torch.relu(h1)).unsqueeze(0))[0]
            D2 = torch.diag((h2 > 0).double())
            C = torch.stack([torch.eye(3, dtype=torch.float64)[y] - torch.eye(3, dtype=torch.float64)[i]
                             for i in range(3) if i != y])
            exact = (C @ W3 @ D2 @ S @ W2 @ D1 @ W1).abs().sum(1)
            ibp = ((C @ W3).abs() @ D2 @ S.abs() @ W2.abs() @ D1 @ W1.abs()).sum(1)
            expected.append((exact / ibp).mean())
            exact2 = (S @ W2 @ D1 @ W1).abs().sum(1)
            ibp2 = (S.abs() @ W2.abs() @ D1 @ W1.abs()).sum(1)
            expected_layer2.append(torch.nanmean(torch.where(ibp2 > 0, exact2 / ibp2, torch.nan)))
    assert not torch.stack(expected).isnan().any()
    assert result.per_sample == pytest.approx(torch.stack(expected).tolist())
    assert result.final == pytest.approx(torch.stack(expected).mean().item())
    assert result.per_layer[0] == pytest.approx(1.0)
    assert result.per_layer[1] == pytest.approx(torch.stack(expected_layer2).mean().item())


def _linearized(ops, masks, absolute):
    """The fixed-pattern network without biases, as a function of one input (for jacobians)."""

    def forward(x):
        x = x.unsqueeze(0)
        for index, op in enumerate(ops):
            if isinstance(op, LinearOp):
                x = x @ (op.weight.abs() if absolute else op.weight).T
            elif isinstance(op, ConvOp):
                x = torch.nn.functional.conv2d(x, op.weight.abs() if absolute else op.weight, None,
                                               op.stride, op.padding)
            elif isinstance(op, ChannelAffineOp):
                scale = op.scale.abs() if absolute else op.scale
                x = x * op.broadcast(scale, x.dim())
            elif isinstance(op, ReluOp):
                x = x * masks[index]
            else:
                x = op(x)
        return x[0]

    return forward


def test_tightness_of_a_conv_network_matches_dense_jacobians():
    ops = lower_network(random_network(5))
    x = random_inputs(5, batch=2)
    labels = torch.tensor([1, 3])
    pre = relu_pre_activations(ops, x)
    C = margin_rows(labels, 5, torch.float64, "cpu")
    values = tightness_rows(ops, x, C)
    for b in range(2):
        masks = {i: (p[b:b + 1] > 0).double() for i, p in pre.items()}
        J = torch.autograd.functional.jacobian(_linearized(ops, masks, False), x[b]).flatten(1)
        J_abs = torch.autograd.functional.jacobian(_linearized(ops[:-1], masks, True), x[b]).flatten(1)
        exact = (C[b] @ J).abs().sum(1)
        ibp = ((C[b] @ ops[-1].weight).abs() @ J_abs).sum(1)
        assert values[b].tolist() == pytest.approx((exact / ibp).tolist())


def test_tightness_is_one_for_nonnegative_weights_and_identity_patterns_and_at_most_one_always():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator, dtype=torch.float64))
            layer.bias.fill_(0.1)  # positive inputs and biases: every ReLU active (identity pattern)
        model[4].weight.copy_(torch.tensor([[2.0, 3.0, 1.0, 2.0], [1.0, 1.0, 0.5, 1.0]]))  # W_0 - W_1 >= 0
    x = torch.rand((4, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = propagation_tightness(model, x, torch.tensor([0, 1, 0, 1]))
    assert result.final == pytest.approx(1.0)
    assert result.per_layer == pytest.approx([1.0, 1.0])
    for seed in range(3):
        ops = lower_network(random_network(seed))
        general = propagation_tightness(ops, random_inputs(seed, batch=4), torch.tensor([0, 1, 2, 4]),
                                        max_neurons=5, generator=torch.Generator().manual_seed(0))
        assert max(general.per_sample) <= 1 + 1e-9 and min(general.per_sample) >= 0
        assert all(v <= 1 + 1e-9 for v in general.per_layer)
        assert general.per_layer[0] == pytest.approx(1.0)
        assert general.neurons_per_layer == [5, 5, 5]


# ------------------------------------------------------------------------------------------------
# Corruptions


@pytest.fixture(scope="module")
def digits():
    from ctbench.data import load_dataset

    return load_dataset("mnist").test.images[:6].numpy()


@pytest.fixture(scope="module")
def colour_images():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    smooth = gaussian_filter(rng.random((4, 3, 32, 32)), (0, 0, 3, 3))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    images = (40 + 150 * smooth).astype(np.uint8)
    images[:, :, 10:22, 10:22] = np.array([220, 40, 70], dtype=np.uint8)[:, None, None]
    return images


def _f(images):
    return images.astype(np.float64)


def _total_variation(images):
    x = _f(images)
    return np.abs(np.diff(x, axis=-1)).sum() + np.abs(np.diff(x, axis=-2)).sum()


def _high_frequency_energy(images):
    x = _f(images)
    laplacian = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return (laplacian ** 2).mean()


def _bright(images):
    return (images > 128).sum()


def _contrast(original, images):
    """Mean of the originally bright pixels minus mean of the originally dark ones."""
    grey = _f(original).mean(1)
    mask = grey > grey.mean()
    out = _f(images).mean(1)
    return out[mask].mean() - out[~mask].mean()


MNIST_EXPECTED = {
    "shot_noise": lambda a, b: _high_frequency_energy(b) > _high_frequency_energy(a),
    "impulse_noise": lambda a, b: _high_frequency_energy(b) > 1.5 * _high_frequency_energy(a),
    "glass_blur": lambda a, b: _total_variation(b) < _total_variation(a),
    "motion_blur": lambda a, b: _total_variation(b) < _total_variation(a),
    "brightness": lambda a, b: b.mean() > a.mean() + 50,
    "stripe": lambda a, b: _bright(b) > _bright(a) + 100,
    "dotted_line": lambda a, b: _bright(b) > _bright(a),
    "zigzag": lambda a, b: _bright(b) > _bright(a),
    "fog": lambda a, b: _contrast(a, b) < 0.6 * _contrast(a, a),
    "spatter": lambda a, b: (a != b).any() and abs(b.mean() - a.mean()) < 30,
}


def _moved_but_mass_kept(a, b, tolerance=0.25):
    mass_a, mass_b = _f(a).sum(), _f(b).sum()
    return abs(mass_b - mass_a) < tolerance * mass_a and np.abs(_f(a) - _f(b)).sum() > 0.3 * mass_a


def _spread(images):
    x = _f(images)[:, 0]
    rows, cols = np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")
    mass = x.sum((1, 2))
    centre_r, centre_c = (x * rows).sum((1, 2)) / mass, (x * cols).sum((1, 2)) / mass
    return (((rows - centre_r[:, None, None]) ** 2 + (cols - centre_c[:, None, None]) ** 2) * x).sum() / mass.sum()


MNIST_EXPECTED.update({
    "rotate": _moved_but_mass_kept,
    "shear": _moved_but_mass_kept,
    "translate": _moved_but_mass_kept,
    "scale": lambda a, b: _spread(b) < 0.7 * _spread(a) and _f(b).sum() > 0.3 * _f(a).sum(),
})


def test_mnist_c_has_the_fifteen_corruptions_of_the_paper():
    assert sorted(corruption_names("mnist")) == sorted([
        "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
        "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges"])
    assert len(corruption_names("cifar10")) == 18


@pytest.mark.parametrize("name", corruption_names("mnist"))
def test_mnist_corruption_is_deterministic_and_does_what_it_says(name, digits):
    out = corrupt(digits, name, "mnist", seed=3)
    assert out.shape == digits.shape and out.dtype == np.uint8
    assert out.min() >= 0 and out.max() <= 255
    assert np.array_equal(out, corrupt(digits, name, "mnist", seed=3))
    assert not np.array_equal(out, digits)
    if name == "canny_edges":
        from scipy.ndimage import binary_dilation, maximum_filter, minimum_filter

        assert set(np.unique(out)) <= {0, 255} and (out == 255).any()
        ink = digits[:, 0] > 64
        boundary = binary_dilation(maximum_filter(ink, size=(1, 3, 3)) != minimum_filter(ink, size=(1, 3, 3)),
                                   iterations=1)
        edges = out[:, 0] == 255
        assert (edges & boundary).sum() >= 0.9 * edges.sum()
    else:
        assert MNIST_EXPECTED[name](digits, out)


CIFAR_EXPECTED = {
    "brightness": lambda a, b: b.mean() > a.mean() + 10,
    "contrast": lambda a, b: _contrast(a, b) < 0.3 * _contrast(a, a),
    "fog": lambda a, b: _contrast(a, b) < 0.7 * _contrast(a, a),
    "frost": lambda a, b: _contrast(a, b) < 0.9 * _contrast(a, a),
    "defocus_blur": lambda a, b: _total_variation(b) < _total_variation(a),
    "gaussian_blur": lambda a, b: _total_variation(b) < _total_variation(a),
    # glass blur scrambles pixels locally (it can raise the total variation of a smooth image):
    # the image changes, its local averages hardly
    "glass_blur": lambda a, b: _local_mean_gap(a, b) < 0.5 * np.abs(_f(a) - _f(b)).mean(),
    "motion_blur": lambda a, b: _total_variation(b) < _total_variation(a),
    "zoom_blur": lambda a, b: _total_variation(b) < _total_variation(a),
    "gaussian_noise": lambda a, b: _high_frequency_energy(b) > 2 * _high_frequency_energy(a),
    "shot_noise": lambda a, b: _high_frequency_energy(b) > 2 * _high_frequency_energy(a),
    "impulse_noise": lambda a, b: _high_frequency_energy(b) > 2 * _high_frequency_energy(a),
    "speckle_noise": lambda a, b: _high_frequency_energy(b) > 2 * _high_frequency_energy(a),
    "jpeg_compression": lambda a, b: 0 < np.abs(_f(a) - _f(b)).mean() < 10,
    "elastic_transform": lambda a, b: 0 < np.abs(_f(a) - _f(b)).mean() < 60,
    "spatter": lambda a, b: (a != b).mean() > 0.01,
}


def _local_mean_gap(a, b):
    from scipy.ndimage import uniform_filter

    return np.abs(uniform_filter(_f(a), size=(1, 1, 5, 5)) - uniform_filter(_f(b), size=(1, 1, 5, 5))).mean()


def _saturation(images):
    x = _f(images)
    high, low = x.max(1), x.min(1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0).mean()


CIFAR_EXPECTED["saturate"] = lambda a, b: _saturation(b) > _saturation(a)


@pytest.mark.parametrize("name", corruption_names("cifar10"))
def test_cifar_corruption_is_deterministic_and_does_what_it_says(name, colour_images):
    out = corrupt(colour_images, name, "cifar10", seed=5)
    assert out.shape == colour_images.shape and out.dtype == np.uint8
    assert np.array_equal(out, corrupt(colour_images, name, "cifar10", seed=5))
    assert not np.array_equal(out, colour_images)
    if name == "pixelate":
        noise = np.random.default_rng(0).integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
        blocky = corrupt(noise, "pixelate", "cifar10", severity=5)
        equal_neighbours = (blocky[..., :, 1:] == blocky[..., :, :-1]).all(1).mean()
        assert equal_neighbours > 0.25 > (noise[..., :, 1:] == noise[..., :, :-1]).all(1).mean()
    else:
        assert CIFAR_EXPECTED[name](colour_images, out)


def test_severity_scales_cifar_noise_and_random_corruptions_depend_on_the_seed(colour_images):
    mild = corrupt(colour_images, "gaussian_noise", "cifar10", seed=0, severity=1)
    strong = corrupt(colour_images, "gaussian_noise", "cifar10", seed=0, severity=5)
    assert _high_frequency_energy(mild) < _high_frequency_energy(strong)
    assert not np.array_equal(strong, corrupt(colour_images, "gaussian_noise", "cifar10", seed=1, severity=5))
    with pytest.raises(ValueError):
        corrupt(colour_images, "gaussian_noise", "cifar10", severity=6)
    with pytest.raises(KeyError):
        corrupt(colour_images, "snow", "cifar10")


def test_published_files_are_preferred_when_present(tmp_path, digits):
    labels = np.arange(6) % 10
    generated = corrupted_test_set(digits, labels, "fog", "mnist", root=tmp_path, seed=0)
    assert generated.source.startswith("generated")
    folder = tmp_path / "mnist_c" / "fog"
    folder.mkdir(parents=True)
    published = np.full((10, 28, 28, 1), 7, dtype=np.uint8)
    np.save(folder / "test_images.npy", published)
    np.save(folder / "test_labels.npy", np.arange(10, dtype=np.uint8))
    read = corrupted_test_set(digits, labels, "fog", "mnist", root=tmp_path)
    assert read.source.startswith("published") and read.images.shape == (6, 1, 28, 28)
    assert (read.images == 7).all() and read.labels.tolist() == list(range(6))


# ------------------------------------------------------------------------------------------------
# Figures and the command


def _nonempty(paths):
    assert [p.suffix for p in paths] == [".png", ".svg"]
    for path in paths:
        assert path.exists() and path.stat().st_size > 500
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths[1].read_bytes()[:2000]


def test_figures_write_png_and_svg(tmp_path):
    bars = {"train 0.1 / eval 0.1": {"PGD": 0.12, "IBP": 0.03}, "train 0.1 / eval 0.3": {"PGD": 0.3, "IBP": 0.2}}
    _nonempty(unstable_neurons_figure(bars, tmp_path / "fig3"))
    _nonempty(utilization_figure({"train 0.1": {"IBP": 0.2, "SABR": 0.3}}, tmp_path / "fig4", standard=0.43))
    points = [{"method": "IBP", "tightness": 0.4, "certified_accuracy": 0.93, "setting": "mnist 0.1"},
              {"method": "SABR", "tightness": 0.1, "certified_accuracy": 0.95, "setting": "mnist 0.3"}]
    _nonempty(tightness_figure(points, tmp_path / "fig5"))
    _nonempty(ood_heatmap({"IBP": {"fog": 0.42, "stripe": 0.36}, "PGD": {"fog": 0.47, "stripe": 0.95}},
                          tmp_path / "fig6"))
    table = shared_mistakes(np.array([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=bool))
    _nonempty(shared_mistakes_figure({"eps 0.1": table}, tmp_path / "table2"))


def _saved_run(folder, seed=0):
    from ctbench.config import apply_overrides, config_from_dict, config_to_dict
    from ctbench.data import DATASETS
    from ctbench.presets import preset_data
    from ctbench.training import build_model_for
    from ctbench.training.checkpoint import save_checkpoint

    config = config_from_dict(apply_overrides(preset_data("mnist-0.1/ibp"), ["model.architecture=cnn3"]))
    torch.manual_seed(seed)
    model = build_model_for(config, DATASETS.get("mnist").spec)
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_var.fill_(0.05)
    save_checkpoint(folder / "final.pt", {"format": 1, "epoch": 0, "model": model.state_dict(),
                                          "config": config_to_dict(config)})
    return folder


def test_analyze_command_end_to_end(tmp_path, capsys):
    from ctbench.cli import main

    run_a, run_b = _saved_run(tmp_path / "a", 0), _saved_run(tmp_path / "b", 1)
    (run_a / "results.json").write_text(json.dumps({"test": {"certified_accuracy": 0.5}}))
    for folder, certified, eps in (("certify", lambda i: i % 2, 0.1), ("certify-ibp", lambda i: i % 4 == 1, 0.1),
                                   ("certify-eps0.2", lambda i: False, 0.2)):
        (run_b / folder).mkdir()
        (run_b / folder / "verdicts.jsonl").write_text(
            "".join(json.dumps({"index": i, "eps": eps, "verdict": "certified" if certified(i) else "unknown"}) + "\n"
                    for i in range(8)))
    out = tmp_path / "results"
    common = ["--count", "6", "--out", str(out), "--json"]
    assert main(["analyze", "utilization", str(run_a), str(run_b), *common]) == 0
    assert main(["analyze", "fragmentation", str(run_a), "--points", "4", "--eps", "0.05", *common]) == 0
    fragmentation = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entry = fragmentation["entries"][0]
    assert entry["sampled_total"] <= entry["crown_ibp_total"] <= entry["ibp_total"]
    assert main(["analyze", "tightness", str(run_a), "--max-neurons", "4", *common]) == 0
    assert main(["analyze", "ood", str(run_a), "--count", "4", "--out", str(out)]) == 0
    assert main(["analyze", "shared-mistakes", str(run_a), str(run_b), *common]) == 0
    shared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shared["result"]["samples"] == 6 and "verdicts" in shared["sources"][str(run_b)]
    # two verifiers of one model (Table 15): of samples 0-7, 1 and 5 certified by both, 3 and 7 by one
    verifiers = [str(run_b / folder / "verdicts.jsonl") for folder in ("certify", "certify-ibp")]
    assert main(["analyze", "shared-mistakes", *verifiers, "--json"]) == 0
    shared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shared["result"]["observed"] == [4, 2, 2]
    assert main(["analyze", "shared-mistakes", verifiers[0], str(run_b / "certify-eps0.2" / "verdicts.jsonl")]) == 2
    assert "different eps" in capsys.readouterr().err
    assert main(["analyze", "shared-mistakes", *verifiers, "--eps", "0.3"]) == 2
    assert "not the --eps 0.3" in capsys.readouterr().err
    assert main(["analyze", "figures", str(out), "--out", str(tmp_path / "figures")]) == 0
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"fig3_unstable_neurons.png", "fig4_utilization.svg", "fig5_tightness.png", "fig6_ood_mnist.png",
            "table2_shared_mistakes.png", "table2_shared_mistakes.md"} <= names
