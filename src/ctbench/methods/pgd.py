"""PGD adversarial training (Madry et al. 2018).

L_rob = CE at the highest-loss point PGD finds in the eps box (random start around the clean
input, restarts, sign steps of max(0.25, 2/steps) x the box's half-width as in the reference
unless ``attack`` says otherwise). The attack runs on the detached network with this step's
clean BatchNorm statistics.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import pgd_attack
from .base import METHODS, Method, RobustLoss, StepInputs


def adversarial_point(method: Method, step: StepInputs, radius: float | None = None):
    eps = step.eps * method.config.attack.eps_factor if radius is None else radius
    return pgd_attack(step.attack_logits, step.box(eps), step.labels, method.attack_settings(), origin=step.inputs)


@METHODS.register("pgd")
class PGD(Method):
    certified = False

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        adversarial_logits = step.logits(adversarial_point(self, step))
        accuracy = (adversarial_logits.argmax(1) == step.labels).float().mean().item()
        return RobustLoss(F.cross_entropy(adversarial_logits, step.labels), {"pgd_accuracy": accuracy})
