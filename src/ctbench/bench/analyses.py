"""The analyses a suite may choose, by name, each a thin call of a ``ctbench.analysis`` function
on the first ``count`` test samples of a job's model.

``ANALYSES`` maps a name to its function and its options with their defaults; a suite names an
analysis with optional options (``analyses: {tightness: {count: 200, max_neurons: 32}}``).
Each function returns a JSON-ready dict (per-sample lists are dropped). An analysis marked
``certified_only`` runs on the samples among those that the job's certification certified, and
is also given their test indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


DEFAULT_COUNT = 1000


def _utilization(model: nn.Module, images, labels, eps: float, options: dict[str, Any]) -> dict:
    from ..analysis import model_utilization

    return model_utilization(model, images).as_dict()


def _tightness(model: nn.Module, images, labels, eps: float, options: dict[str, Any]) -> dict:
    from ..analysis import propagation_tightness

    generator = torch.Generator().manual_seed(options["seed"])
    result = propagation_tightness(model, images, labels, max_neurons=options["max_neurons"], generator=generator)
    data = result.as_dict()
    data.pop("per_sample")
    return data


def _fragmentation(model: nn.Module, images, labels, eps: float, options: dict[str, Any]) -> dict:
    from ..analysis import unstable_neurons

    generator = torch.Generator().manual_seed(options["seed"])
    return unstable_neurons(model, images, eps, points=options["points"], generator=generator).as_dict()


def _soundness(model: nn.Module, images, labels, eps: float, options: dict[str, Any], indices: list[int],
               progress_path: Path) -> dict:
    from ..certify.audit import audit_certified

    audit = audit_certified(model, images, labels, eps, indices, progress_path=progress_path, **options)
    progress_path.unlink(missing_ok=True)
    return audit.as_dict()


@dataclass(frozen=True)
class Analysis:
    """run(model, images, labels, eps, options[, indices, progress_path]) -> dict; defaults: its
    options besides count (integers, each at least its ``minimums`` entry, else 0);
    certified_only: run on the certified samples, with their test ``indices`` and a file to keep
    its progress in."""

    run: Callable[..., dict]
    defaults: dict[str, Any]
    certified_only: bool = False
    minimums: dict[str, int] = field(default_factory=dict)


ANALYSES: dict[str, Analysis] = {
    "utilization": Analysis(_utilization, {}),
    "tightness": Analysis(_tightness, {"max_neurons": 64, "seed": 0}),
    "fragmentation": Analysis(_fragmentation, {"points": 50, "seed": 0}),
    # a strong PGD on every certified sample: a sound certificate leaves it nothing to break
    "soundness": Analysis(_soundness, {"steps": 100, "restarts": 10, "batch": 250, "seed": 0}, certified_only=True,
                          minimums={"restarts": 1, "batch": 1}),
}
