"""Models from elsewhere: ONNX files imported into ctbench's lowered graph (their logits against
onnxruntime's and torch's, sound IBP/CROWN bounds on them, ``ctbench certify x.onnx``, the
errors), and ``--arch`` with ``--state-dict``."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import ctbench  # noqa: E402
from ctbench.bounds import linf_box, sample_in_box  # noqa: E402
from ctbench.certify.provenance import model_hash  # noqa: E402
from ctbench.cli import main  # noqa: E402
from ctbench.models import Normalize, build_model  # noqa: E402
from ctbench.models.onnx_import import OnnxImportError, compare_with_onnxruntime, import_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MNIST_SHAPE = (1, 28, 28)


def export(model: nn.Module, path, input_shape=MNIST_SHAPE):
    """``model`` as ONNX with a dynamic batch dim; BatchNorm stays a node of its own (PRESERVE:
    the eval-mode export would fold it into the conv before it)."""
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *input_shape),), str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics, so no layer is the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator))
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def cnn_with_batchnorm() -> nn.Module:
    return nn.Sequential(
        Normalize((0.1307,), (0.3081,)),
        nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


class FlatMlp(nn.Module):
    """Takes flat vectors (N, 784): its ONNX input is (N, 784)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.layers((x - 0.5) / 0.25)


class PoolResidual(nn.Module):
    """Average and max pooling, a residual add, a concatenation and x.view(x.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, 1, 1)
        self.inner = nn.Conv2d(4, 4, 3, 1, 1)
        self.head = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.inner(h) + h)
        h = torch.cat([F.avg_pool2d(h, 2), F.max_pool2d(h, 3, 2, 1)], dim=1)
        h = F.avg_pool2d(h, 2)
        return self.head(h.view(h.size(0), -1))


def global_pool() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5, 2, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))


# name: (the torch model, the ONNX input shape per sample, op types its export must contain)
TORCH_MODELS = {
    "cnn-batchnorm": (cnn_with_batchnorm, MNIST_SHAPE, {"Sub", "Div", "Conv", "BatchNormalization", "Gemm"}),
    "flat-mlp": (FlatMlp, (784,), {"Sub", "Div", "Gemm"}),
    "pool-residual": (PoolResidual, MNIST_SHAPE, {"AveragePool", "MaxPool", "Add", "Concat", "Shape", "Reshape"}),
    "global-pool": (global_pool, MNIST_SHAPE, {"GlobalAveragePool", "Flatten"}),
}


def exported(name: str, tmp_path, seed: int = 0):
    """(the torch model on images, the ONNX file of its export)."""
    build, input_shape, op_types = TORCH_MODELS[name]
    model = randomized(build(), seed)
    path = export(model, tmp_path / f"{name}.onnx", input_shape)
    assert op_types <= {node.op_type for node in onnx.load(str(path)).graph.node}
    on_images = (lambda x: model(x.flatten(1))) if input_shape == (784,) else model
    return on_images, path


def images(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((count, *MNIST_SHAPE), generator=torch.Generator().manual_seed(seed))


def constant(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32 if np.asarray(array).dtype.kind == "f"
                                              else np.int64), name)


def handmade_onnx(path, op_type: str = "Relu", input_shape=(1, 1, 28, 28)):
    """A static-batch MLP written with onnx.helper: Reshape to [1, 784], scalar normalization,
    MatMul + Add (the bias), ``op_type`` (node "squash"), MatMul + Add. Returns its numpy reference."""
    generator = np.random.default_rng(0)
    first, second = generator.normal(0, 0.1, (784, 20)), generator.normal(0, 0.3, (20, 10))
    bias1, bias2 = generator.normal(0, 0.1, 20), generator.normal(0, 0.1, 10)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
             helper.make_node("Sub", ["flat", "mean"], ["centered"], name="center"),
             helper.make_node("Div", ["centered", "std"], ["normalized"], name="scale"),
             helper.make_node("MatMul", ["normalized", "w1"], ["product1"], name="fc1"),
             helper.make_node("Add", ["product1", "b1"], ["hidden"], name="fc1_bias"),
             helper.make_node(op_type, ["hidden"], ["active"], name="squash"),
             helper.make_node("MatMul", ["active", "w2"], ["product2"], name="fc2"),
             helper.make_node("Add", ["product2", "b2"], ["logits"], name="fc2_bias")]
    initializers = [constant("shape", [1, 784]), constant("mean", 0.1307), constant("std", 0.3081),
                    constant("w1", first), constant("b1", bias1), constant("w2", second), constant("b2", bias2)]
    graph = helper.make_graph(nodes, "handmade", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    def reference(x: torch.Tensor) -> torch.Tensor:
        hidden = ((x.flatten(1).double().numpy() - 0.1307) / 0.3081) @ first + bias1
        return torch.from_numpy(np.maximum(hidden, 0) @ second + bias2)

    return path, reference


# ----------------------------------------------------------------------------------------------
# The imported network computes what the file does


@pytest.mark.parametrize("name", sorted(TORCH_MODELS))
def test_imported_logits_equal_onnxruntime_and_torch(name, tmp_path):
    model, path = exported(name, tmp_path)
    imported = import_onnx(path, MNIST_SHAPE)
    assert imported.checked_inputs == 8 and imported.max_abs_difference < 1e-5
    x = images(16)
    with torch.no_grad():
        assert torch.allclose(imported.model(x), model(x), rtol=1e-5, atol=1e-5)
        lowered = ctbench.models.ops.run_ops(ctbench.models.ops.lower_network(imported.model), x)
        assert torch.allclose(lowered, model(x), rtol=1e-5, atol=1e-5)


def test_a_handmade_static_batch_mlp_with_matmul_and_add_imports(tmp_path):
    path, reference = handmade_onnx(tmp_path / "mlp.onnx")
    imported = import_onnx(path, MNIST_SHAPE)
    assert imported.onnx_input_shape == (1, 1, 28, 28) and imported.max_abs_difference < 1e-5
    # MatMul + Add became Linear layers with a bias; the normalization one per-feature affine map each
    linears = [module for module in imported.model.modules() if isinstance(module, nn.Linear)]
    assert [linear.bias is not None for linear in linears] == [True, True]
    x = images(5)
    with torch.no_grad():
        assert torch.allclose(imported.model(x).double(), reference(x), atol=1e-5)


@pytest.mark.parametrize("name", ["cnn-batchnorm", "pool-residual"])
def test_ibp_and_crown_bounds_of_an_imported_network_hold_at_sampled_points(name, tmp_path):
    _, path = exported(name, tmp_path, seed=3)
    model = import_onnx(path, MNIST_SHAPE).model.double()
    box = linf_box(images(2, seed=4).double(), 0.02)
    points = sample_in_box(box, 400, torch.Generator().manual_seed(5)).flatten(0, 1)
    with torch.no_grad():
        logits = model(points).view(400, 2, 10)
    for bound in (ctbench.bounds.ibp(model, box.lower, box.upper), ctbench.bounds.crown(model, box.lower, box.upper),
                  ctbench.bounds.crown(model, box.lower, box.upper, intermediate="ibp")):
        assert (logits >= bound.lower - 1e-9).all() and (logits <= bound.upper + 1e-9).all()


def test_the_provenance_model_hash_is_a_hash_of_the_imported_weights(tmp_path):
    _, path = exported("cnn-batchnorm", tmp_path)
    (tmp_path / "other").mkdir()
    _, other = exported("cnn-batchnorm", tmp_path / "other", seed=1)
    first = model_hash(import_onnx(path, MNIST_SHAPE).model)
    assert first == model_hash(import_onnx(path, MNIST_SHAPE, check=False).model)
    assert first != model_hash(import_onnx(other, MNIST_SHAPE).model)


# ----------------------------------------------------------------------------------------------
# ctbench certify / evaluate


@pytest.fixture(scope="module")
def trained_mlp(mnist):
    """An MLP trained for a few seconds on MNIST: most test samples are certified at eps 0.01."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_images, labels = mnist.train.images[:3000].float() / 255, mnist.train.labels[:3000]
    for step in range(300):
        batch = slice(step * 100 % 3000, step * 100 % 3000 + 100)
        optimizer.zero_grad()
        F.cross_entropy(model(train_images[batch]), labels[batch]).backward()
        optimizer.step()
    return model.eval()


def test_certify_an_onnx_file_from_the_command_line(trained_mlp, tmp_path, capsys):
    path = export(trained_mlp, tmp_path / "x.onnx")
    assert main(["certify", str(path), "--data", "mnist", "--eps", "0.01", "--count", "5", "--timeout", "10",
                 "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "its logits match onnxruntime's on 8 random inputs" in captured.err
    assert summary["complete"] and summary["samples"] == 5 and sum(summary["counts"].values()) == 5
    assert summary["counts"]["certified"] >= 3
    lines = (tmp_path / "x-certify-eps0.01" / "verdicts.jsonl").read_text().splitlines()
    verdicts = [json.loads(line) for line in lines]
    assert sorted(verdict["index"] for verdict in verdicts) == [0, 1, 2, 3, 4]
    imported_hash = model_hash(import_onnx(path, MNIST_SHAPE).model)
    assert {verdict["provenance"]["model"] for verdict in verdicts} == {imported_hash}


def test_evaluate_an_onnx_file_and_the_options_it_needs(trained_mlp, tmp_path, capsys):
    path = export(trained_mlp, tmp_path / "x.onnx")
    assert main(["evaluate", str(path), "--data", "mnist", "--eps", "0.01", "--count", "20", "--steps", "0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 20
    for argv, message in ((["--eps", "0.01"], "needs --data"), (["--data", "mnist"], "give --eps"),
                          (["--data", "mnist", "--eps", "0.1", "--arch", "cnn3"], "go together")):
        assert main(["evaluate", str(path), *argv]) == 2
        assert message in capsys.readouterr().err


def test_an_unsupported_op_is_refused_naming_its_type_and_node(tmp_path, capsys):
    path, _ = handmade_onnx(tmp_path / "tanh.onnx", op_type="Tanh")
    with pytest.raises(OnnxImportError, match=r"node 'squash' \(Tanh\): the op type Tanh is not supported"):
        import_onnx(path, MNIST_SHAPE)
    assert main(["certify", str(path), "--data", "mnist", "--eps", "0.1", "--count", "1"]) == 2
    assert "'squash' (Tanh)" in capsys.readouterr().err


def test_an_input_shape_that_does_not_fit_the_data_is_refused_naming_both(tmp_path):
    path, _ = handmade_onnx(tmp_path / "rgb.onnx", input_shape=(1, 3, 32, 32))
    with pytest.raises(OnnxImportError, match=r"has shape \(N, 3, 32, 32\) but the data's images are "
                                              r"\(N, 1, 28, 28\) \(or flat \(N, 784\)\)"):
        import_onnx(path, MNIST_SHAPE)


def test_logits_that_differ_from_onnxruntime_are_refused(tmp_path):
    _, path = exported("global-pool", tmp_path)
    imported = import_onnx(path, MNIST_SHAPE)
    head = [module for module in imported.model.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        head.bias[0] += 1e-2
    with pytest.raises(OnnxImportError, match="differ from onnxruntime's by up to"):
        compare_with_onnxruntime(imported.model, path, imported.onnx_input_shape, MNIST_SHAPE, 1e-4, 8)


def test_without_onnxruntime_the_check_is_skipped_with_a_warning(tmp_path, monkeypatch):
    _, path = exported("global-pool", tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        imported = import_onnx(path, MNIST_SHAPE)
    assert imported.max_abs_difference is None and imported.checked_inputs == 0


# ----------------------------------------------------------------------------------------------
# --arch with --state-dict


def test_arch_with_a_state_dict_certifies_and_evaluates_that_network(mnist, tmp_path, capsys):
    model = randomized(build_model("cnn3", mnist.spec, batch_norm=True), seed=2)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    options = ["--arch", "cnn3", "--state-dict", str(tmp_path / "weights.pt"), "--data", "mnist", "--eps", "0.01"]
    assert main(["evaluate", *options, "--count", "30", "--steps", "0", "--json"]) == 0
    test_images, labels = mnist.test.images[:30].float() / 255, mnist.test.labels[:30]
    with torch.no_grad():
        expected = (model(test_images).argmax(1) == labels).float().mean().item()
    assert json.loads(capsys.readouterr().out)["natural_accuracy"] == pytest.approx(expected)
    assert main(["certify", *options, "--count", "3", "--stages", "ibp,attack", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["model"] == model_hash(model)
    assert (tmp_path / "weights-certify-eps0.01" / "verdicts.jsonl").is_file()


def test_a_state_dict_of_another_shape_is_refused_naming_the_first_differing_tensor(mnist, tmp_path, capsys):
    state = build_model("cnn3", mnist.spec, batch_norm=True).state_dict()
    state["8.weight"], state["8.bias"] = state["8.weight"][:5], state["8.bias"][:5]  # a head of 5 classes
    torch.save(state, tmp_path / "five.pt")
    assert main(["certify", "--arch", "cnn3", "--state-dict", str(tmp_path / "five.pt"), "--data", "mnist",
                 "--eps", "0.1"]) == 2
    error = capsys.readouterr().err
    assert "8.weight has shape (5, 1568) in the checkpoint but (10, 1568) in the model" in error
    assert "Give the --arch it was saved from" in error
