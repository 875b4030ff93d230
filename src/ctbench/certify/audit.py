"""An audit of certified verdicts: a strong PGD on every certified sample finds nothing when the
verifier is sound.

``attack_certified`` attacks a batch of samples (margin loss, random starts, sign steps of a
tenth of the box width halved at 50% and 75% of the steps; by default 100 steps x 10 restarts,
far more than the cascade's attack stage) with the model's population statistics, and returns
the highest margin max_{i != y} z_i - z_y it reaches per sample, measured by a plain forward
pass of the model at the point found. A positive margin is a misclassified point inside the
box: a certified sample with one has a wrong certificate. ``CertifiedAudit`` keeps the count
over batches, as ``benchmarks/soundness_check.py`` and the bench analysis ``soundness`` report it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..attacks.pgd import PGDSettings, margin_loss, pgd_attack
from ..bounds.box import linf_box
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
