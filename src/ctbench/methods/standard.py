"""Standard training: cross-entropy on clean inputs, no perturbation."""
from __future__ import annotations

import torch.nn.functional as F

from .base import METHODS, Method, RobustLoss, StepInputs


@METHODS.register("standard")
class Standard(Method):
    """Plain empirical risk minimization; L_rob is the natural loss, so w_rob has no effect."""

    certified = False
    trains_with_attacks = False

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        return RobustLoss(F.cross_entropy(step.clean_logits, step.labels))
