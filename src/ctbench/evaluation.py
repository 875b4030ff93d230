"""Test-time metrics: natural accuracy, IBP-certified accuracy (optionally also the tighter of
IBP and CROWN-IBP), adversarial accuracy under PGD or APGD.

Evaluation uses the model's population BatchNorm statistics. A sample counts as adversarially
robust when it is classified correctly and the attack finds no misclassified point; a
certified sample is robust without being attacked. The attacks: ``PGDSettings``, ctbench's PGD
(``attacks.evaluation_pgd``: restarts alternating between the cross-entropy and the margin
loss), or ``APGDAttack``, APGD-CE then APGD-T (Croce & Hein 2020) on the samples APGD-CE did not
fool. Every result names its attack (``EvaluationResult.attack``). These are float32 screening numbers; the
certification cascade (``ctbench certify``) gives the per-sample verdicts, proven by rigorous
floating-point bounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .attacks import PGDSettings, describe_pgd, evaluation_pgd
from .attacks.apgd import APGDSettings, autoattack_like
from .bounds import ibp_margin_lower, is_certified, linf_box
from .bounds.crown import crown_ibp_margin_lower
from .data import Split, iterate_batches, num_batches
from .models.ops import lower_network, run_ops

ProgressFactory = Callable[[Iterable, int, str], Iterable]


@dataclass(frozen=True)
class APGDAttack:
    """APGD-CE, then APGD-T (targeted DLR loss, one run per target among the ``targets`` classes
    of highest clean logit) on the samples APGD-CE did not fool: ``attacks.apgd.autoattack_like``
    with ``iterations`` steps and ``restarts`` random starts per run."""

    iterations: int = 100
    restarts: int = 1
    targets: int = 9

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1 or self.targets < 1:
            raise ValueError(f"APGD needs iterations, restarts and targets >= 1, got {self.iterations}, "
                             f"{self.restarts}, {self.targets}")


Attack = PGDSettings | APGDAttack


def describe_attack(attack: Attack | None) -> str | None:
    """The attack's name in tables: "PGD 20x3 (CE+margin)", "APGD-CE+APGD-T 100 it. x1, 9 targets"."""
    if attack is None:
        return None
    if isinstance(attack, APGDAttack):
        return f"APGD-CE+APGD-T {attack.iterations} it. x{attack.restarts}, {attack.targets} targets"
    return describe_pgd(attack)


@dataclass(frozen=True)
class EvaluationResult:
    samples: int
    eps: float
    natural_accuracy: float
    certified_accuracy: float
    adversarial_accuracy: float | None
    crown_ibp_certified_accuracy: float | None = None  # certified by IBP or CROWN-IBP
    attack: str | None = None  # the attack of adversarial_accuracy (``describe_attack``)

    def as_dict(self) -> dict:
        result = {"samples": self.samples, "eps": self.eps, "natural_accuracy": self.natural_accuracy,
                  "certified_accuracy": self.certified_accuracy, "adversarial_accuracy": self.adversarial_accuracy,
                  "attack": self.attack}
        if self.crown_ibp_certified_accuracy is not None:
            result["crown_ibp_certified_accuracy"] = self.crown_ibp_certified_accuracy
        return result


def evaluate(model: nn.Module, split: Split, eps: float, device, batch_size: int = 1000,
             attack: Attack | None = PGDSettings(steps=20, restarts=3), count: int | None = None,
             crown_ibp: bool = False, progress: ProgressFactory | None = None,
             description: str = "evaluate") -> EvaluationResult:
    """Accuracies of ``model`` on the first ``count`` samples of ``split`` at radius ``eps``;
    ``progress(batches, total, description)`` may wrap the batches (a progress bar)."""
    split = split.head(count)
    ops = lower_network(model, detach=True, fold=True)
    correct = certified = robust = tighter = 0
    batches = iterate_batches(split, batch_size, device)
    if progress is not None:
        batches = progress(batches, num_batches(len(split), batch_size), description)
    for number, (images, labels) in enumerate(batches):
        with torch.no_grad():
            logits = run_ops(ops, images)
            predicted, num_classes = logits.argmax(1), logits.shape[1]
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
                indices = number * batch_size + open_.nonzero().flatten()
                still_robust[open_] = _survives(ops, images[open_], labels[open_], eps, attack, indices)
            robust += (safe | still_robust).sum().item()
    total = len(split)
    return EvaluationResult(total, eps, correct / total, certified / total,
                            robust / total if attack is not None else None, tighter / total if crown_ibp else None,
                            describe_attack(attack))


def _survives(ops, x: Tensor, y: Tensor, eps: float, attack: Attack, indices: Tensor) -> Tensor:
    """Per sample: whether ``attack`` found no misclassified point in the box of radius eps
    around x. APGD draws each sample's starts from its index in the split (``indices``)."""
    logits_fn = lambda z: run_ops(ops, z)  # noqa: E731
    if isinstance(attack, APGDAttack):
        settings = APGDSettings(iterations=attack.iterations, restarts=attack.restarts)
        _, robust = autoattack_like(logits_fn, x, y, eps, ce=settings, targeted=settings,
                                    target_count=attack.targets, seeds=indices.tolist())
        return robust
    point = evaluation_pgd(logits_fn, linf_box(x, eps), y, attack)
    with torch.no_grad():
        return run_ops(ops, point).argmax(1) == y
