"""CROWN-IBP (Zhang et al. 2020), with or without loss fusion (Xu et al. 2020).

IBP bounds every ReLU input; one CROWN back-substitution bounds the output. Without fusion the
spec is the K-1 margins z_y - z_i and L_rob is the cross-entropy of the worst-case logits.

With loss fusion the spec is one row per sample: the cross-entropy itself is bounded.
With m_i = z_i - z_y in [l_i, u_i] (IBP, last-layer elision) and M = max_i u_i,

    CE = M + log sum_i exp(m_i - M) <= M + log( sum_i a_i m_i + b_i ),

where a_i m + b_i is the chord of exp(m - M) over [l_i, u_i] (exp is convex, so the chord lies
above it). sum_i a_i m_i = (sum_i a_i (e_i - e_y)) . z is one linear spec row, bounded above by
CROWN. Every exponent is <= 0 after the shift by M, so nothing overflows at any eps (the
reference computes exp(-lb) unshifted and returns NaN early in training).

Options: loss_fusion (default true).
Usage: ``ctbench train mnist-0.1/crown_ibp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bounds import Box, is_certified, worst_case_logits
from ..bounds.crown import crown_ibp_margin_lower, crown_upper_bounds, intermediate_bounds
from ..bounds.ibp import elided_margin_box, elision_input
from ..models.ops import LinearOp, network_ops
from .base import METHODS, Method, RobustLoss, StepInputs


@dataclass(frozen=True)
class CrownIbpOptions:
    loss_fusion: bool = True


def exp_chord(lower: Tensor, upper: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Slope a and intercept b with exp(m - shift) <= a m + b on [lower, upper] (upper <= shift)."""
    width = upper - lower
    exp_lower, exp_upper = torch.exp(lower - shift), torch.exp(upper - shift)
    narrow = width < 1e-4
    slope = torch.where(narrow, exp_lower * (1 + width / 2), (exp_upper - exp_lower) / torch.where(narrow, 1.0, width))
    return slope, exp_lower - slope * lower


def fused_cross_entropy_bound(step: StepInputs, box: Box, intermediate: dict[int, Box]) -> Tensor:
    """Per-sample upper bound of max over the box of CE(f(x), y), overflow-safe (module doc)."""
    ops, labels = step.ops, step.labels
    last = network_ops(ops)[-1]
    if not isinstance(last, LinearOp):
        raise ValueError("CROWN-IBP loss fusion needs a network that ends in a Linear layer")
    features, _ = elision_input(ops, box)
    margins = elided_margin_box(last, features, labels)  # z_y - z_i
    lower, upper = -margins.upper, -margins.lower  # m_i = z_i - z_y; entry y is exactly 0
    shift = upper.max(dim=1, keepdim=True).values.detach()
    slope, intercept = exp_chord(lower, upper, shift)
    own = F.one_hot(labels, step.num_classes).to(torch.bool)
    slope, intercept = slope.masked_fill(own, 0.0), intercept.masked_fill(own, 0.0)
    # sum_i a_i (z_i - z_y) as a spec row over the logits: c = a - (sum_i a_i) e_y
    spec = slope - slope.sum(dim=1, keepdim=True) * own.to(slope.dtype)
    linear_upper = crown_upper_bounds(ops, box, spec.unsqueeze(1), intermediate).squeeze(1)
    exp_sum_upper = linear_upper + intercept.sum(dim=1) + torch.exp(-shift.squeeze(1))  # + exp(m_y - M)
    floor = torch.exp(-shift.squeeze(1))  # the label's own term: the sum is never below it
    return shift.squeeze(1) + torch.log(torch.maximum(exp_sum_upper, floor))


@METHODS.register("crown_ibp")
class CrownIBP(Method):
    Options = CrownIbpOptions
    trains_with_attacks = False

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        box = step.box()
        intermediate = intermediate_bounds(step.ops, box, "crown-ibp")
        if self.options.loss_fusion:
            return RobustLoss(fused_cross_entropy_bound(step, box, intermediate).mean())
        margin_lower = crown_ibp_margin_lower(step.ops, box, step.labels, step.num_classes, intermediate)
        certified = is_certified(margin_lower.detach(), step.labels).float().mean().item()
        return RobustLoss(F.cross_entropy(worst_case_logits(margin_lower), step.labels),
                          {"crown_ibp_certified": certified})
