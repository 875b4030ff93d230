"""benchmarks/independent_check.py, the second opinion on certified accuracy, agrees sample by
sample with ctbench's IBP and CROWN-IBP on random CNN3-BN networks, its bounds hold on sampled
points, and it reads the IDX files as ctbench does."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctbench.bounds import ibp_margin_lower, is_certified, linf_box
from ctbench.bounds.crown import crown_ibp_margin_lower
from ctbench.models import build_model
from ctbench.models.cnn import InputSpec
from ctbench.models.ops import lower_network

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "independent_check.py"
spec = importlib.util.spec_from_file_location("independent_check", SCRIPT)
independent = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = independent  # its dataclasses look their module up by name
spec.loader.exec_module(independent)


def _random_cnn3(seed: int, mean: float, std: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("cnn3", InputSpec(1, 28, 10, (mean,), (std,)))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics and affine parameters away from identity
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(-1.5, 1.5)  # negative scales too
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("seed,mean,std,eps", [(0, 0.1307, 0.3081, 3e-4), (1, 0.0, 1.0, 5e-3), (2, 0.0, 1.0, 0.0)])
def test_independent_ibp_agrees_with_ctbench_per_sample(tmp_path, seed, mean, std, eps):
    model = _random_cnn3(seed, mean, std)
    torch.save({"model": model.state_dict()}, tmp_path / "final.pt")
    images = np.random.default_rng(seed).integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    x = torch.from_numpy(images).double().unsqueeze(1) / 255
    with torch.no_grad():
        labels = model.double()(x).argmax(1)  # correct by construction, so certification decides
        margins, _ = ibp_margin_lower(lower_network(model), linf_box(x, eps), labels)
        crown = crown_ibp_margin_lower(lower_network(model), linf_box(x, eps), labels, 10)
    expected = is_certified(margins, labels)
    by_crown = is_certified(crown, labels)
    if eps > 0:
        assert 0 < expected.sum() < len(labels)  # eps chosen so that the comparison is not vacuous
        assert (by_crown & ~expected).any()  # CROWN-IBP certifies samples IBP does not: the cascade adds
    result = independent.check(tmp_path, eps, images, labels.numpy(), batch=24, relative_threshold=0.0,
                               absolute_threshold=0.0)  # ctbench's raw bounds: certified when > 0
    assert result["correct"] == len(labels)
    assert result["ibp_certified_samples"] == int(expected.sum())
    assert result["crown_ibp_certified_samples"] == int(by_crown.sum())
    assert result["cascade_certified_samples"] == int((expected | by_crown).sum())
    if eps == 0.0:
        assert result["ibp_certified_samples"] == len(labels)  # a point box certifies every correct sample
        # the safety threshold applies: no margin z_y - z_j (at most 2 max|z|) exceeds 10 max|z|
        strict = independent.check(tmp_path, eps, images, labels.numpy(), relative_threshold=10.0)
        assert strict["correct"] == len(labels) and strict["cascade_certified_samples"] == 0


@pytest.mark.parametrize("seed,eps", [(3, 2e-3), (4, 1e-2)])
def test_independent_bounds_hold_on_sampled_points_and_match_ctbench(seed, eps):
    model = _random_cnn3(seed, 0.1307, 0.3081)
    net = independent.Cnn3Bn(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 28, 28, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (16,), generator=generator)
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    ibp, boxes = net.ibp(lower, upper, labels)
    crown = net.crown_ibp(lower, upper, labels, boxes)
    with torch.no_grad():
        expected = crown_ibp_margin_lower(lower_network(model.double()), linf_box(x, eps), labels, 10)
    rows = torch.arange(16)
    crown_others = crown.clone()
    crown_others[rows, labels] = 0.0
    assert torch.allclose(crown_others, expected, rtol=1e-9, atol=1e-9)
    assert (crown - ibp)[ibp > -1e6].abs().max() > 1e-3  # the two bounds differ: each is checked on its own
    # every sampled point of the box (corners included) respects both lower bounds
    for _ in range(20):
        corner = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.float64)
        for point in (lower + (upper - lower) * torch.rand(x.shape, generator=generator, dtype=torch.float64),
                      lower + (upper - lower) * corner):
            logits = net.logits(point)
            margins = logits.gather(1, labels[:, None]) - logits
            assert (margins >= ibp - 1e-9).all() and (margins >= crown - 1e-9).all()


def test_independent_idx_reader_reads_what_ctbench_reads(mnist):
    folder = SCRIPT.parent.parent / "src" / "ctbench" / "data" / "bundled" / "mnist"
    images = independent.read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = independent.read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert torch.equal(torch.from_numpy(images.copy()).reshape(mnist.test.images.shape), mnist.test.images)
    assert torch.equal(torch.from_numpy(labels.astype(np.int64)), mnist.test.labels.long())


def test_a_network_other_than_cnn3_bn_is_refused_by_name(tmp_path):
    torch.save({"model": build_model("cnn5", InputSpec(1, 28, 10, (0.0,), (1.0,))).state_dict()}, tmp_path / "final.pt")
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(SystemExit, match="not a CNN3-BN state"):
        independent.check(tmp_path, 0.1, images, np.zeros(2, dtype=np.int64))
