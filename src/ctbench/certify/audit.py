"""An audit of certified verdicts: a strong PGD on every certified sample finds nothing when the
verifier is sound.

``attack_certified`` attacks a batch of samples (margin loss, random starts, sign steps of a
tenth of the box width halved at 50% and 75% of the steps; by default 100 steps x 10 restarts,
far more than the cascade's attack stage) with the model's population statistics, and returns
the highest margin max_{i != y} z_i - z_y it reaches per sample, measured by a plain forward
pass of the model at the point found. A positive margin is a misclassified point inside the
box: a certified sample with one has a wrong certificate. ``CertifiedAudit`` keeps the count
over batches; ``audit_certified`` runs them, keeping its progress in a file from which a stopped
audit continues (``benchmarks/soundness_check.py`` and the bench analysis ``soundness``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..attacks.pgd import PGDSettings, margin_loss, pgd_attack
from ..bounds.box import linf_box
from ..io import atomic_write_json
from ..models.ops import lower_network, run_ops


def attack_certified(model: nn.Module, images: Tensor, labels: Tensor, eps: float, steps: int = 100,
                     restarts: int = 10, data_range: tuple[float, float] = (0.0, 1.0),
                     generator: torch.Generator | None = None) -> Tensor:
    """The highest margin PGD reaches in each sample's box (positive: misclassified)."""
    ops = lower_network(model, detach=True)
    settings = PGDSettings(steps=steps, restarts=restarts, step_size=0.1, decay_at=(0.5, 0.75))
    box = linf_box(images, eps, *data_range)
    point = pgd_attack(lambda z: run_ops(ops, z), box, labels, settings, loss_fn=margin_loss, generator=generator)
    with torch.no_grad():
        return margin_loss(model(point), labels)


@dataclass
class CertifiedAudit:
    """Counts of an audit over batches: samples attacked, the test indices PGD broke (must be
    none) and the highest margin reached (negative: no sample came close to misclassified)."""

    steps: int
    restarts: int
    attacked: int = 0
    broken_indices: list[int] = field(default_factory=list)
    max_margin_reached: float = float("-inf")

    def add(self, indices: list[int], margins: Tensor) -> None:
        self.attacked += len(indices)
        self.broken_indices += [index for index, margin in zip(indices, margins.tolist()) if margin > 0]
        if margins.numel():
            self.max_margin_reached = max(self.max_margin_reached, margins.max().item())

    def as_dict(self) -> dict:
        return {**asdict(self), "counterexamples_found": len(self.broken_indices)}


def audit_certified(model: nn.Module, images: Tensor, labels: Tensor, eps: float, indices: list[int], *,
                    steps: int = 100, restarts: int = 10, batch: int = 250, seed: int = 0,
                    progress_path: Path | None = None, on_batch: Callable[[CertifiedAudit], None] | None = None
                    ) -> CertifiedAudit:
    """The audit of the samples ``images`` (test ``indices``), batch by batch. After each batch
    the counts go to ``progress_path``, from which an audit of the same samples, eps and attack
    continues; each batch draws its random starts from its own seed, so a continued audit
    equals an uninterrupted one. ``images``: floats in [0, 1] or uint8."""
    key = {"indices": indices, "eps": eps, "steps": steps, "restarts": restarts, "batch": batch, "seed": seed}
    audit = CertifiedAudit(steps, restarts)
    if progress_path is not None and progress_path.exists():
        saved = json.loads(progress_path.read_text())
        if saved.get("key") == key:
            audit = CertifiedAudit(**saved["audit"])
    for start in range(audit.attacked, len(indices), batch):
        rows = slice(start, start + batch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        batch_images = images[rows].float() / 255 if images.dtype == torch.uint8 else images[rows].float()
        audit.add(indices[rows], attack_certified(model, batch_images, labels[rows], eps, steps, restarts,
                                                  generator=generator))
        if progress_path is not None:
            atomic_write_json(progress_path, {"key": key, "audit": asdict(audit)})
        if on_batch is not None:
            on_batch(audit)
    return audit
