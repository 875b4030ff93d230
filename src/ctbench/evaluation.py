"""Test-time metrics: natural accuracy, IBP-certified accuracy (optionally also the tighter of
IBP and CROWN-IBP), PGD adversarial accuracy.

Evaluation uses the model's population BatchNorm statistics. A sample counts as adversarially
robust when it is classified correctly and PGD (margin loss) finds no misclassified point; a
certified sample is robust without being attacked. These are float32 screening numbers; the
certification cascade (``ctbench certify``) gives the per-sample verdicts, proven by rigorous
floating-point bounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attacks import PGDSettings, margin_loss, pgd_attack
from .bounds import ibp_margin_lower, is_certified, linf_box
from .bounds.crown import crown_ibp_margin_lower
from .data import Split, iterate_batches
from .models.ops import lower_network, run_ops


@dataclass(frozen=True)
class EvaluationResult:
    samples: int
    eps: float
    natural_accuracy: float
    certified_accuracy: float
    adversarial_accuracy: float | None
    crown_ibp_certified_accuracy: float | None = None  # certified by IBP or CROWN-IBP

    def as_dict(self) -> dict:
        result = {"samples": self.samples, "eps": self.eps, "natural_accuracy": self.natural_accuracy,
                  "certified_accuracy": self.certified_accuracy, "adversarial_accuracy": self.adversarial_accuracy}
        if self.crown_ibp_certified_accuracy is not None:
            result["crown_ibp_certified_accuracy"] = self.crown_ibp_certified_accuracy
        return result


def evaluate(model: nn.Module, split: Split, eps: float, device, batch_size: int = 1000,
             attack: PGDSettings | None = PGDSettings(steps=20, restarts=3), count: int | None = None,
             crown_ibp: bool = False) -> EvaluationResult:
    split = split.head(count)
    ops = lower_network(model, detach=True, fold=True)
    num_classes = model[-1].out_features
    correct = certified = robust = tighter = 0
    for images, labels in iterate_batches(split, batch_size, device):
        with torch.no_grad():
            predicted = run_ops(ops, images).argmax(1)
            right = predicted == labels
            margin_lower, _ = ibp_margin_lower(ops, linf_box(images, eps), labels)
            safe = is_certified(margin_lower, labels) & right
            correct += right.sum().item()
            certified += safe.sum().item()
            if crown_ibp:
                open_ = right & ~safe
                if open_.any():
                    crown_lower = crown_ibp_margin_lower(ops, linf_box(images[open_], eps), labels[open_], num_classes)
                    safe = safe.clone()
                    safe[open_] = is_certified(crown_lower, labels[open_])
                tighter += safe.sum().item()
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
                            robust / total if attack is not None else None, tighter / total if crown_ibp else None)
