"""Test-time metrics: natural accuracy, IBP-certified accuracy, PGD adversarial accuracy.

Evaluation uses the model's population BatchNorm statistics. A sample counts as adversarially
robust when it is classified correctly and PGD (margin loss) finds no misclassified point; an
IBP-certified sample is robust without being attacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attacks import PGDSettings, margin_loss, pgd_attack
from .bounds import ibp_margin_lower, is_certified, linf_box
from .data import Split, iterate_batches
from .models.ops import lower_network, run_ops


@dataclass(frozen=True)
class EvaluationResult:
    samples: int
    eps: float
    natural_accuracy: float
    certified_accuracy: float
    adversarial_accuracy: float | None

    def as_dict(self) -> dict:
        return {"samples": self.samples, "eps": self.eps, "natural_accuracy": self.natural_accuracy,
                "certified_accuracy": self.certified_accuracy, "adversarial_accuracy": self.adversarial_accuracy}


def evaluate(model: nn.Module, split: Split, eps: float, device, batch_size: int = 1000,
             attack: PGDSettings | None = PGDSettings(steps=20, restarts=3), count: int | None = None) -> EvaluationResult:
    split = split.head(count)
    ops = lower_network(model, detach=True)
    correct = certified = robust = 0
    for images, labels in iterate_batches(split, batch_size, device):
        with torch.no_grad():
            predicted = run_ops(ops, images).argmax(1)
            right = predicted == labels
            margin_lower, _ = ibp_margin_lower(ops, linf_box(images, eps), labels)
            safe = is_certified(margin_lower, labels) & right
        correct += right.sum().item()
        certified += safe.sum().item()
        if attack is not None:
            open_ = right & ~safe
            still_robust = open_.clone()
            if open_.any():
                x, y = images[open_], labels[open_]
                point = pgd_attack(lambda z: run_ops(ops, z), linf_box(x, eps), y, attack, loss_fn=margin_loss)
                with torch.no_grad():
                    still_robust[open_] = run_ops(ops, point).argmax(1) == y
            robust += (safe | still_robust).sum().item()
    total = len(split)
    return EvaluationResult(total, eps, correct / total, certified / total,
                            robust / total if attack is not None else None)
