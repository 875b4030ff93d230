"""Export for external verifiers: the model as ONNX, each sample's property as VNN-LIB 1.0.

ONNX: ``export_onnx`` writes the model in eval mode (population BatchNorm statistics; the input
normalization is the first layer, so the network's input is the image in [0, 1]) with the
TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), input ``input`` of shape
(batch, C, H, W) with a dynamic batch dim and output ``logits``. Needs the ``onnx`` package
(the ``certify`` extra); ``onnxruntime`` is only used by the tests.

VNN-LIB 1.0 (the VNN-COMP form, a small SMT-LIB subset): one real per input element
``X_0 .. X_{n-1}`` (the image flattened in C, H, W order) and per logit ``Y_0 .. Y_{K-1}``; the
input box [max(x - eps, lo), min(x + eps, hi)] as two bounds per input; and the
*counterexample region* as one disjunction: the property is violated (the network is not
robust) iff some Y_i >= Y_y with i != y:

    (assert (or (and (>= Y_0 Y_7)) (and (>= Y_1 Y_7)) ...))

A verifier that proves the region empty certifies the sample. Bounds are written as decimals
without exponent (SMT-LIB has none), the shortest that read back as the same float64.
``export_vnncomp_benchmark`` writes a benchmark folder as the competition expects it: the model in
``onnx/``, the properties in ``vnnlib/`` and ``instances.csv`` (onnx, property, timeout per line)
with paths relative to the folder.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..io import atomic_write_text
from .verdicts import box_bounds_float64


def export_onnx(model: nn.Module, path: Path | str, input_shape: Sequence[int], opset: int = 17) -> Path:
    """Write ``model`` (a copy in float32 eval mode on the CPU) to ``path`` as ONNX."""
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exported = copy.deepcopy(model).to("cpu", torch.float32).eval()
    dummy = torch.zeros(1, *input_shape)
    temporary = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(exported, (dummy,), str(temporary), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset)
    temporary.replace(path)
    return path


def _number(value: float) -> str:
    """A decimal without exponent (SMT-LIB has none), the shortest that reads back exactly."""
    import numpy as np

    return np.format_float_positional(float(value), unique=True, trim="0")


def vnnlib_text(x: Tensor, label: int, eps: float, num_classes: int,
                data_range: tuple[float, float] = (0.0, 1.0), comment: str = "") -> str:
    """The VNN-LIB 1.0 property of one sample (no batch dim), see the module docstring."""
    lower, upper = box_bounds_float64(x, eps, data_range)
    lower, upper = lower.flatten().tolist(), upper.flatten().tolist()
    lines = []
    if comment:
        lines += [f"; {line}" for line in comment.splitlines()]
    lines.append(f"; L_inf ball of radius {eps!r} around the sample, clamped to [{data_range[0]}, {data_range[1]}]; label {label}")
    lines.append("")
    lines += [f"(declare-const X_{i} Real)" for i in range(len(lower))]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines.append("")
    lines.append("; input box")
    for i, (lo, hi) in enumerate(zip(lower, upper)):
        lines.append(f"(assert (<= X_{i} {_number(hi)}))")
        lines.append(f"(assert (>= X_{i} {_number(lo)}))")
    lines.append("")
    lines.append(f"; unsafe region: some other class scores at least as high as class {label}")
    terms = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label)
    lines.append(f"(assert (or {terms}))")
    return "\n".join(lines) + "\n"


def write_vnnlib(path: Path | str, x: Tensor, label: int, eps: float, num_classes: int,
                 data_range: tuple[float, float] = (0.0, 1.0), comment: str = "") -> Path:
    path = Path(path)
    atomic_write_text(path, vnnlib_text(x, label, eps, num_classes, data_range, comment))
    return path


def export_vnnlib(images: Tensor, labels: Tensor, indices: Iterable[int], eps: float, out_dir: Path | str,
                  num_classes: int, data_range: tuple[float, float] = (0.0, 1.0)) -> list[Path]:
    """One ``prop_<index>.vnnlib`` per sample in ``out_dir`` (uint8 images are divided by 255)."""
    out_dir = Path(out_dir)
    paths = []
    for index in indices:
        image = images[index]
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        path = write_vnnlib(out_dir / f"prop_{index}.vnnlib", x, int(labels[index]), eps, num_classes, data_range,
                            comment=f"ctbench property: test sample {index}, eps {eps!r}")
        paths.append(path)
    return paths


def export_vnncomp_benchmark(model: nn.Module, input_shape: Sequence[int], images: Tensor, labels: Tensor,
                             indices: Iterable[int], eps: float, folder: Path | str, num_classes: int, *,
                             name: str = "model", timeout: float = 1000.0,
                             data_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """A benchmark folder as VNN-COMP lays them out: ``onnx/<name>.onnx``, ``vnnlib/prop_<i>.vnnlib``
    and ``instances.csv`` (onnx, property, timeout per line) whose paths are relative to the
    folder, so the folder can be moved or shipped as it is. Returns the instances file."""
    folder = Path(folder)
    onnx_path = export_onnx(model, folder / "onnx" / f"{name}.onnx", input_shape)
    properties = export_vnnlib(images, labels, indices, eps, folder / "vnnlib", num_classes, data_range)
    rows = [f"{onnx_path.relative_to(folder).as_posix()},{path.relative_to(folder).as_posix()},{timeout:g}"
            for path in properties]
    instances = folder / "instances.csv"
    atomic_write_text(instances, "\n".join(rows) + "\n")
    return instances
