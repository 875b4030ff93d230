"""MTL-IBP (De Palma et al. 2024): a convex combination of the IBP and PGD losses.

L_rob = ibp_coefficient x L_IBP(eps box) + (1 - ibp_coefficient) x L_PGD, where the attack
box has radius attack.eps_factor x eps (2 on CIFAR-10 2/255). The paper pairs it with SWA.

Options: ibp_coefficient (tau, default 0.02).
Usage: ``ctbench train mnist-0.1/mtl_ibp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import METHODS, Method, RobustLoss, StepInputs
from .ibp import ibp_loss
from .pgd import adversarial_point


@dataclass(frozen=True)
class MtlIbpOptions:
    ibp_coefficient: float = 0.02

    def __post_init__(self) -> None:
        if not 0 <= self.ibp_coefficient <= 1:
            raise ValueError(f"method.ibp_coefficient must lie in [0, 1], got {self.ibp_coefficient}")


@METHODS.register("mtl_ibp")
class MtlIbp(Method):
    Options = MtlIbpOptions

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        tau = self.options.ibp_coefficient
        adversarial_logits = step.logits(adversarial_point(self, step))
        pgd = F.cross_entropy(adversarial_logits, step.labels)
        ibp = ibp_loss(step, step.box())
        metrics = {**ibp.metrics, "pgd_accuracy": (adversarial_logits.argmax(1) == step.labels).float().mean().item()}
        return RobustLoss(tau * ibp.loss + (1 - tau) * pgd, metrics, ibp.ibp_boxes, ibp.ibp_input_box)
