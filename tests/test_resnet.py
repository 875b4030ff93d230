"""The registered small ResNet (a DAG): lowering, every training method on it with clean-batch
BatchNorm statistics, gradient accumulation, population statistics, and the whole pipeline
(train with IBP on a tiny MNIST subset, certify with the cascade)."""
from __future__ import annotations

import pytest
import torch

from ctbench.certify import CertifySettings, certify
from ctbench.config import apply_overrides, config_from_dict
from ctbench.data import DATASETS
from ctbench.methods import StepInputs
from ctbench.models import InputSpec, build_model, initialize, parameter_count
from ctbench.models.ops import AddOp, AvgPoolOp, Graph, batchnorm_layers, clean_forward, lower_network, run_ops
from ctbench.presets import load_config, preset_data
from ctbench.training import StepSettings, Trainer, compute_step_gradients, make_method
from ctbench.training.batchnorm import recompute_population_statistics
from ctbench.data import Split

SPEC = InputSpec(1, 12, 4, (0.1,), (0.9,))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnet(seed: int = 0, batch_norm: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet_small", SPEC, batch_norm).double()
    initialize(model, "ibp")
    return model


def batch(seed: int = 0, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((size, 1, 12, 12), generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (size,), generator=generator))


def test_resnet_small_is_registered_and_lowers_to_a_residual_dag():
    mnist = build_model("resnet_small", DATASETS.get("mnist").spec, True)
    assert parameter_count(mnist) == 177_630
    assert mnist.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    cifar = build_model("resnet_small", DATASETS.get("cifar10").spec, False).eval()
    graph = lower_network(cifar)
    assert isinstance(graph, Graph)
    assert sum(isinstance(op, AddOp) for op in graph.ops) == 2 and any(isinstance(op, AvgPoolOp) for op in graph.ops)
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(run_ops(graph, x), cifar(x), atol=1e-5)
    assert load_config("mnist-mini-0.1/ibp_resnet").model.architecture == "resnet_small"


@pytest.mark.parametrize("method", ["standard", "pgd", "edac", "ibp", "crown_ibp", "sabr", "mtl_ibp"])
def test_every_chain_free_method_trains_the_resnet_with_clean_batch_statistics(method):
    model = tiny_resnet()
    config = config_from_dict({"method": {"name": method}, "attack": {"steps": 2, "restarts": 1}})
    x, y = batch()
    logits, stats = clean_forward(model, x)
    assert set(stats.per_layer) == set(batchnorm_layers(model)) and "4.norm1" in stats.per_layer
    step = StepInputs(model, x, y, 0.01, 0.2, lower_network(model, stats, fold=True),
                      lower_network(model, stats.detached(), detach=True, fold=True), logits, stats, 4)
    loss = make_method(config).robust_loss(step).loss
    assert torch.isfinite(loss)
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


@pytest.mark.parametrize("method", ["taps", "staps"])
def test_taps_and_staps_refuse_the_resnet_from_the_first_step(method):
    model = tiny_resnet()
    config = config_from_dict({"method": {"name": method}, "attack": {"steps": 2, "restarts": 1}})
    x, y = batch()
    logits, stats = clean_forward(model, x)
    step = StepInputs(model, x, y, 0.01, 0.2, lower_network(model, stats),
                      lower_network(model, stats.detached(), detach=True), logits, stats, 4)
    with pytest.raises(ValueError, match="DAG"):
        make_method(config).robust_loss(step)


def _gradients(chunks: int) -> list[torch.Tensor]:
    model = tiny_resnet(seed=1)
    config = config_from_dict({"method": {"name": "ibp"}, "optim": {"batch_size": 8, "accumulation_steps": chunks},
                               "regularization": {"l1": 1e-4}})
    x, y = batch(seed=2)
    compute_step_gradients(model, make_method(config), config, StepSettings(0.01, 0.2, 4), x, y)
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_gradient_of_the_resnet_equals_the_full_batch():
    full, accumulated = _gradients(1), _gradients(4)
    for a, b in zip(full, accumulated):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_population_statistics_of_the_resnet_are_set_per_batchnorm_module():
    model = tiny_resnet(seed=3).float()
    images = (torch.rand(16, 1, 12, 12) * 255).to(torch.uint8)
    split = Split(images, torch.zeros(16, dtype=torch.long))
    recompute_population_statistics(model, split, 16, "cpu")
    _, stats = clean_forward(model, images.float() / 255)
    for key, layer in batchnorm_layers(model).items():
        assert torch.allclose(layer.running_mean, stats.per_layer[key][0])
        assert torch.allclose(layer.running_var, stats.per_layer[key][1])


def test_resnet_trains_with_ibp_on_a_tiny_mnist_subset_and_certifies_with_the_cascade(tmp_path, mnist):
    overrides = ["data.train_subset=512", "data.validation_size=0", "optim.batch_size=64", "optim.epochs=2",
                 "optim.lr=2e-3", "optim.lr_milestones=[]", "eps.train_eps=0.02", "eps.test_eps=0.01",
                 "eps.ramp_end_epoch=1", "evaluation.final_test_count=64", "evaluation.attack_steps=2",
                 "evaluation.attack_restarts=1"]
    config = config_from_dict(apply_overrides(preset_data("mnist-mini-0.1/ibp_resnet"), overrides))
    trainer = Trainer(config, tmp_path / "run", dataset=mnist)
    results = trainer.fit()
    assert results["test"]["natural_accuracy"] > 0.2
    model = trainer.model.eval()
    images, labels = mnist.test.images[:12], mnist.test.labels[:12]
    result = certify(model, (images, labels), 0.01, stages="ibp,crown-ibp,attack,alpha-crown", timeout=30,
                     settings=CertifySettings(cross_check=True), out_dir=tmp_path / "certify")
    counts = result.summary["counts"]
    assert sum(counts.values()) == 12 and counts["certified"] >= 3
    assert (tmp_path / "certify" / "verdicts.jsonl").exists()
