"""The public Python API: the README's examples run as written, inputs are checked with errors
that name the fix, bounds contain the network's outputs, ``import ctbench`` stays light."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ctbench
from ctbench.bounds import Box, sample_in_box
from ctbench.config import ConfigError

README = Path(__file__).parent.parent / "README.md"
QUICK = {"optim.epochs": 1, "eps.ramp_end_epoch": 1, "data.validation_size": 64, "evaluation.attack_steps": 2,
         "evaluation.attack_restarts": 1}


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # one namespace: later blocks use what earlier ones made
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "my-net" / "final.pt").exists()


def test_import_ctbench_does_not_import_torch():
    code = "import sys, ctbench; print('torch' in sys.modules, ctbench.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and out[1]


def test_the_public_names_are_the_functions_and_the_packages_keep_their_modules():
    from ctbench.bounds.crown import crown_bounds
    from ctbench.certify.cascade import certify as cascade

    assert callable(ctbench.train) and callable(ctbench.evaluate) and callable(ctbench.certify)
    assert ctbench.certify.certify is cascade and callable(crown_bounds)
    assert ctbench.bounds.ibp.__name__ == "network_ibp" and ctbench.bounds.crown.__name__ == "network_crown"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ctbench.nothing  # noqa: B018


def small_images(count=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 8, 8, generator=generator), torch.randint(0, 3, (count,), generator=generator)


def mlp(outputs=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, outputs))


def test_train_takes_your_network_and_tensors_and_trains_the_network_in_place(tmp_path):
    images, labels = small_images()
    model = mlp()
    results = ctbench.train("mnist-mini-0.1/ibp", model=model, data=(images, labels), out=tmp_path / "run",
                            overrides={**QUICK, "model.init": "keep"})
    assert results["dataset"] == "user" and results["test"] is None and results["validation"]["samples"] == 64
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    assert final["custom_model"] and all(torch.equal(final["model"][k], v) for k, v in model.state_dict().items())
    from ctbench.cli import main

    assert main(["evaluate", str(tmp_path / "run")]) == 2  # its config cannot rebuild the network
    assert main(["train", str(tmp_path / "run"), "--resume", "--quiet"]) == 2


class ResidualNet(nn.Module):
    """A custom forward: a residual block and average pooling, as a user writes them."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.head = nn.AvgPool2d(2), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.pool(x).flatten(1))


def test_train_and_certify_a_custom_module_with_a_residual_block_and_average_pooling(tmp_path):
    images, labels = small_images()
    model = ResidualNet()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    results = ctbench.train("mnist-mini-0.1/ibp", model=model, data=(images, labels), out=tmp_path / "run",
                            overrides={**QUICK, "model.init": "keep", "model.batch_norm": False})
    assert results["validation"]["samples"] == 64
    assert any(not torch.equal(before[key], value) for key, value in model.state_dict().items())  # trained in place
    result = ctbench.certify(model, images[:8], labels[:8], eps=0.01, stages="ibp,crown-ibp,attack", timeout=5)
    assert len(result.verdicts) == 8 and {v.verdict for v in result.verdicts} <= {"certified", "falsified", "wrong",
                                                                                 "unknown"}


def test_train_names_what_is_wrong_with_the_network_the_data_or_the_overrides(tmp_path):
    images, labels = small_images()
    train = lambda **kw: ctbench.train("mnist-mini-0.1/ibp", out=tmp_path / "run", **kw)  # noqa: E731
    with pytest.raises(ConfigError, match="model gives 5 outputs but the data has 6 classes"):
        train(model=mlp(5), data=(images, torch.where(labels == 2, 5, labels)), overrides=QUICK)
    with pytest.raises(ConfigError, match="must end in an nn.Linear layer.*its output comes from Relu"):
        train(model=nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.ReLU()), data=(images, labels), overrides=QUICK)
    with pytest.raises(ConfigError, match="does not take images of shape"):
        train(model=nn.Sequential(nn.Flatten(), nn.Linear(50, 3)), data=(images, labels), overrides=QUICK)
    with pytest.raises(ConfigError, match=r"data \(an \(images, labels\) pair.*: images must lie in .*\[0, 1\]"):
        train(model=mlp(), data=(images * 255, labels), overrides=QUICK)
    with pytest.raises(ConfigError, match="unknown config key optim.learning_rate"):
        train(model=mlp(), data=(images, labels), overrides={"optim.learning_rate": 1})
    with pytest.raises(ConfigError, match="data.validation_size=5000 must be in"):
        train(model=mlp(), data=(images, labels),
              overrides={"optim.epochs": 1, "eps.ramp_end_epoch": 1, "data.validation_size": 5000})
    with pytest.raises(ConfigError, match="give out=FOLDER"):
        ctbench.train({"data": {"dataset": "mnist"}}, overrides=QUICK)
    assert not (tmp_path / "run").exists()


def test_evaluate_and_certify_check_their_inputs():
    from ctbench.certify import CertifyInputError

    images, labels = small_images(8)
    model = mlp()
    report = ctbench.evaluate(model, images, labels, eps=0.01, attack="apgd", steps=5)
    assert report["samples"] == 8 and report["attack"].startswith("APGD-CE+APGD-T 5 it.")
    assert ctbench.evaluate(model, images, labels, eps=0.01, attack=None)["adversarial_accuracy"] is None
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        ctbench.evaluate(model, images, labels, eps=0.01, attack="fgsm")
    with pytest.raises(CertifyInputError, match="eps must be finite and >= 0"):
        ctbench.evaluate(model, images, labels, eps=-1)
    result = ctbench.certify(model, images, labels, eps=0.0, stages="ibp")
    assert result.summary["complete"] and result.summary["samples"] == 8
    with pytest.raises(CertifyInputError, match="data range"):
        ctbench.certify(model, images + 1, labels, eps=0.1)


def test_bounds_contain_the_outputs_and_crown_is_at_least_as_tight_as_ibp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 20),
                          nn.ReLU(), nn.Linear(20, 4)).eval()
    model[2].running_mean.normal_()
    center = torch.rand(3, 1, 3, 4)
    lower, upper = center - 0.1, center + 0.1
    boxes = {"ibp": ctbench.bounds.ibp(model, lower, upper), "crown": ctbench.bounds.crown(model, lower, upper),
             "crown-ibp": ctbench.bounds.crown(model, lower, upper, intermediate="ibp"),
             "alpha": ctbench.bounds.crown(model, lower, upper, alpha_iterations=10)}
    with torch.no_grad():
        outputs = model(sample_in_box(Box(lower, upper), 200).flatten(0, 1)).view(200, 3, 4)
    for name, box in boxes.items():
        assert box.lower.shape == (3, 4), name
        assert (outputs >= box.lower - 1e-5).all() and (outputs <= box.upper + 1e-5).all(), name
    assert (boxes["crown"].lower >= boxes["ibp"].lower - 1e-5).all()
    assert (boxes["alpha"].lower >= boxes["crown"].lower - 1e-5).all()
    assert (boxes["crown"].upper - boxes["crown"].lower).sum() < (boxes["ibp"].upper - boxes["ibp"].lower).sum()
    with pytest.raises(ValueError, match="lower > upper"):
        ctbench.bounds.ibp(model, upper, lower)
    with pytest.raises(ValueError, match="give a batch of boxes"):
        ctbench.bounds.crown(model, lower[0, 0, 0], upper[0, 0, 0])
