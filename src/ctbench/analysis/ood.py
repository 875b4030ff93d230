"""Out-of-distribution generalization (paper section 5.5, Figures 6 and 9): accuracy under each
corruption divided by the clean accuracy, for one model.

Corrupted test sets come from ``corruptions.corrupted_test_set``: the published MNIST-C /
CIFAR-10-C files under ``root`` when present, else generated; each entry records its source.
The model runs with its population BatchNorm statistics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.ops import run_ops
from .corruptions import corrupted_test_set, corruption_names
from .utilization import ModelOrOps, as_ops, ops_dtype_device, to_float_images


def accuracy(model_or_ops: ModelOrOps, images: Tensor | np.ndarray, labels: Tensor | np.ndarray,
             batch_size: int = 500) -> float:
    """Natural accuracy on images (uint8 (N, C, H, W) or floats in [0, 1])."""
    ops = as_ops(model_or_ops)
    dtype, device = ops_dtype_device(ops)
    labels = torch.as_tensor(np.asarray(labels)).long()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = to_float_images(images[start:start + batch_size], dtype, device)
            predicted = run_ops(ops, x).argmax(1).cpu()
            correct += (predicted == labels[start:start + batch_size]).sum().item()
    return correct / max(len(labels), 1)


@dataclass(frozen=True)
class OODResult:
    """Clean accuracy and, per corruption, accuracy, ratio to clean accuracy and data source."""

    dataset: str
    samples: int
    clean_accuracy: float
    accuracy: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def ood_generalization(model_or_ops: ModelOrOps, images: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                       dataset: str = "mnist", *, names: Sequence[str] | None = None,
                       root: str | Path | None = None, seed: int = 0, severity: int | None = None,
                       batch_size: int = 500) -> OODResult:
    """OOD generalization = accuracy on the corrupted test set / clean accuracy, per corruption.

    Args:
        model_or_ops: a ctbench model or its lowered ops.
        images, labels: the clean test samples, uint8 (N, C, H, W) and (N,).
        dataset: "mnist" (MNIST-C, 15 corruptions) or "cifar10" (CIFAR-10-C, 18).
        names: a subset of the corruptions (default: all of the suite).
        root: folder holding the published files (``mnist_c/<name>/test_images.npy`` or
            ``CIFAR-10-C/<name>.npy``); used in preference to generating when present.
        seed, severity: for generated corruptions (severity: CIFAR-10-C only, default 5).
    """
    ops = as_ops(model_or_ops)
    images_np = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    labels_np = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    clean = accuracy(ops, images_np, labels_np, batch_size)
    accuracies, ratios, sources = {}, {}, {}
    for name in names or corruption_names(dataset):
        corrupted = corrupted_test_set(images_np, labels_np, name, dataset, root=root, seed=seed, severity=severity)
        accuracies[name] = accuracy(ops, corrupted.images, corrupted.labels, batch_size)
        ratios[name] = accuracies[name] / clean if clean > 0 else float("nan")
        sources[name] = corrupted.source
    return OODResult(dataset, len(labels_np), clean, accuracies, ratios, sources)
