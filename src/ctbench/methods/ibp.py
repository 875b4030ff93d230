"""IBP training (Gowal et al. 2018) with the initialization and warm-up of Shi et al. (2021).

L_rob = CE(worst-case logits), entry i = -lb(z_y - z_i) from interval bounds of the eps box,
with the margin spec multiplied into the last layer (last-layer elision).

Usage: ``ctbench train mnist-0.1/ibp`` (Shi et al.'s regularizer is set in the preset).
"""
from __future__ import annotations

import torch.nn.functional as F

from ..bounds import Box, IBPOptions, ibp_margin_lower, is_certified, worst_case_logits
from .base import METHODS, Method, RobustLoss, StepInputs


def ibp_loss(step: StepInputs, box: Box, options: IBPOptions = IBPOptions()) -> RobustLoss:
    """CE of the worst-case logits of ``box``; the boxes are kept for the warm-up regularizer."""
    margin_lower, boxes = ibp_margin_lower(step.ops, box, step.labels, options)
    loss = F.cross_entropy(worst_case_logits(margin_lower), step.labels)
    certified = is_certified(margin_lower.detach(), step.labels).float().mean().item()
    return RobustLoss(loss, {"ibp_certified": certified}, boxes, box)


@METHODS.register("ibp")
class IBP(Method):
    trains_with_attacks = False

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        return ibp_loss(step, step.box())
