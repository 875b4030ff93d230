"""The analyses a suite may choose, by name, each a thin call of a ``ctbench.analysis`` function
on the first ``count`` test samples of a job's model.

``ANALYSES`` maps a name to its function and its options with their defaults; a suite names an
analysis with optional options (``analyses: {tightness: {count: 200, max_neurons: 32}}``).
Each function returns a JSON-ready dict (per-sample lists are dropped). An analysis marked
``certified_only`` runs on the samples among those that the job's certification certified, and
is also given their test indices.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io import atomic_write_json
from .jobs import read_record

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
    """The audit batch by batch; after each batch its counts go to ``progress_path``, from which
    an interrupted audit of the same samples and options continues (each batch's random starts
    come from its own seed, so a resumed audit equals an uninterrupted one)."""
    from ..analysis.utilization import to_float_images
    from ..certify.audit import CertifiedAudit, attack_certified

    if options["batch"] < 1 or options["restarts"] < 1:
        raise ValueError(f"analyses.soundness: batch and restarts must be >= 1, got {options['batch']} and "
                         f"{options['restarts']}")
    key = {"options": options, "indices": indices, "eps": eps}
    saved = read_record(progress_path)
    audit = CertifiedAudit(options["steps"], options["restarts"])
    if saved is not None and saved["key"] == key:
        audit = CertifiedAudit(**saved["audit"])
    for start in range(audit.attacked, len(indices), options["batch"]):
        rows = slice(start, start + options["batch"])
        generator = torch.Generator().manual_seed(options["seed"] * 1_000_003 + start)
        audit.add(indices[rows], attack_certified(model, to_float_images(images[rows]), labels[rows], eps,
                                                  options["steps"], options["restarts"], generator=generator))
        atomic_write_json(progress_path, {"key": key, "audit": asdict(audit)})
    progress_path.unlink(missing_ok=True)
    return audit.as_dict()


@dataclass(frozen=True)
class Analysis:
    """run(model, images, labels, eps, options[, indices, progress_path]) -> dict; defaults: its
    options besides count; certified_only: run on the certified samples, with their test
    ``indices`` and a file to keep its progress in."""

    run: Callable[..., dict]
    defaults: dict[str, Any]
    certified_only: bool = False


ANALYSES: dict[str, Analysis] = {
    "utilization": Analysis(_utilization, {}),
    "tightness": Analysis(_tightness, {"max_neurons": 64, "seed": 0}),
    "fragmentation": Analysis(_fragmentation, {"points": 50, "seed": 0}),
    # a strong PGD on every certified sample: a sound certificate leaves it nothing to break
    "soundness": Analysis(_soundness, {"steps": 100, "restarts": 10, "batch": 250, "seed": 0}, certified_only=True),
}
