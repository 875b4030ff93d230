import math

import pytest
import torch
from torch import nn

from ctbench.data import DATASETS
from ctbench.models import Normalize, build_model, initialize, parameter_count


@pytest.mark.parametrize("dataset,millions", [("mnist", 13.26), ("cifar10", 17.19), ("tinyimagenet", 17.29)])
def test_cnn7_bn_has_the_papers_parameter_count(dataset, millions):
    model = build_model("cnn7", DATASETS.get(dataset).spec, batch_norm=True)
    assert round(parameter_count(model) / 1e6, 2) == millions


@pytest.mark.parametrize("name", ["cnn3", "cnn5", "cnn7"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_models_are_plain_sequentials_of_standard_layers(name, batch_norm):
    spec = DATASETS.get("cifar10").spec
    model = build_model(name, spec, batch_norm)
    assert type(model) is nn.Sequential and isinstance(model[0], Normalize)
    allowed = (Normalize, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.Flatten, nn.Linear)
    assert all(isinstance(layer, allowed) for layer in model)
    assert any(isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) for layer in model) == batch_norm
    assert isinstance(model[-1], nn.Linear) and model[-1].out_features == 10
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_ibp_init_draws_normal_weights_with_std_sqrt_2pi_over_fan_in():
    torch.manual_seed(0)
    model = build_model("cnn7", DATASETS.get("mnist").spec, True)
    initialize(model, "ibp")
    affine = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in affine[1:-1]:  # large enough for a tight std estimate
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.05)
        assert layer.weight.mean().abs().item() < 0.1 * math.sqrt(2 * math.pi) / fan_in
        assert (layer.bias == 0).all()
    last = affine[-1].weight
    assert last.abs().max() <= 1 / math.sqrt(last.shape[1]) + 1e-6  # torch's default stays on the last layer


def test_kaiming_init_is_uniform_with_relu_gain():
    torch.manual_seed(0)
    model = build_model("cnn5", DATASETS.get("mnist").spec, True)
    initialize(model, "kaiming")
    layer = [m for m in model if isinstance(m, nn.Linear)][0]
    bound = math.sqrt(2) * math.sqrt(3 / layer.weight.shape[1])
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
