"""TAPS (Mao et al. 2023): IBP through a feature extractor, PGD through the classifier head.

The network is split so that the head holds its last ``classifier_size`` ReLU layers. IBP
bounds the latent features of the eps box; inside that latent box, each margin z_i - z_y
(i != y) gets its own PGD attack on the head (K-1 points per sample, ``attacks.margin_pgd``).
The head's outputs at those points form the worst-case logits of the TAPS cross-entropy. Gradients reach
the latent box bounds through a rectified linear link: for the upper bound, weight 0 where
the point lies below ub - c (ub - lb) rising linearly to 1 at ub (c = 0.5), symmetrically for
the lower bound; that gradient is multiplied by ``gradient_scale``. L_rob = TAPS-CE x IBP-CE.
During the eps warm-up TAPS falls back to plain IBP. Unless attack.step_size is set, the latent
attack steps max(0.2, 2/steps) x the latent box's width, as the reference's (whose start is
uniform in the box, which "clamped_noise" around the centre is; its x0.2 decay after 70% of
10 or more steps is not applied under step_schedule constant).

Options: classifier_size (ReLU layers in the head, default 1), gradient_scale (default 4).
Usage: ``ctbench train mnist-0.1/taps``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks.input_ops import flatten_in_memory_order
from ..attacks.margin_pgd import margin_pgd
from ..bounds import Box, ibp_margin_lower, interval_bounds, worst_case_logits
from ..models.ops import FlattenOp, Network, ReluOp, is_dag, run_ops
from .base import METHODS, Method, RobustLoss, StepInputs
from .ibp import ibp_loss

LINK_FRACTION = 0.5


def latent_step_fraction(steps: int) -> float:
    """The reference's latent step, max(0.2, 2/steps) of the width, as a fraction of the half-width."""
    return 2 * max(0.2, 2 / max(steps, 1))


@dataclass(frozen=True)
class TapsOptions:
    classifier_size: int = 1
    gradient_scale: float = 4.0

    def __post_init__(self) -> None:
        if self.classifier_size < 1:
            raise ValueError(f"method.classifier_size must be >= 1, got {self.classifier_size}")
        if self.gradient_scale <= 0:
            raise ValueError(f"method.gradient_scale must be > 0, got {self.gradient_scale}")


def split_index(ops: Network, classifier_size: int) -> int:
    """Index of the first op of the head, the part after the ReLU that precedes the last
    ``classifier_size`` ReLU layers (and after a Flatten right behind that ReLU). The network
    must be a chain: a DAG has no single latent tensor to attack."""
    if is_dag(ops):
        raise ValueError("TAPS and STAPS split a chain network into a feature extractor and a head at one ReLU "
                         "layer; this network is a DAG (residual connections or concatenations): use another method")
    relus = [index for index, op in enumerate(ops) if isinstance(op, ReluOp)]
    if classifier_size >= len(relus):
        raise ValueError(f"method.classifier_size={classifier_size} leaves no feature extractor: the network has "
                         f"{len(relus)} ReLU layers")
    index = relus[-classifier_size - 1] + 1
    while index < len(ops) and isinstance(ops[index], FlattenOp):
        index += 1  # the extractor flattens once, the attack steps then see flat latent points
    return index


class _GradientLink(torch.autograd.Function):
    """Identity on the detached attack points (B, T, ...); backward, the gradient g of the point
    of sample b and target j reaches sample b's upper bound as gradient_scale x w_up x g and its
    lower bound as gradient_scale x w_low x g, summed over j, where w_up rises linearly from 0 at
    ub - c (ub - lb) to 1 at ub (c = LINK_FRACTION) and w_low symmetrically. The weights are formed
    one target at a time in the backward pass: no temporary holds all B x T points (TAPS on
    CNN7 would fault in a dozen of 0.2 GB each)."""

    @staticmethod
    def forward(ctx, point: Tensor, lower: Tensor, upper: Tensor, gradient_scale: float) -> Tensor:
        ctx.save_for_backward(point, lower, upper)
        ctx.gradient_scale = gradient_scale
        return point

    @staticmethod
    def backward(ctx, grad: Tensor):
        point, lower, upper = ctx.saved_tensors
        band = (LINK_FRACTION * (upper - lower)).clamp(min=1e-12)
        upper_start, lower_end = upper - band, lower + band
        lower_grad, upper_grad = torch.zeros_like(lower), torch.zeros_like(upper)
        for target in range(point.shape[1]):
            scaled = grad[:, target] * ctx.gradient_scale
            upper_grad += ((point[:, target] - upper_start) / band).clamp_(0, 1) * scaled
            lower_grad += ((lower_end - point[:, target]) / band).clamp_(0, 1) * scaled
        return None, lower_grad, upper_grad, None


def linked_point(point: Tensor, latent: Box, gradient_scale: float) -> Tensor:
    """The attack points (B, T, ...) (values unchanged) with the rectified linear gradient link to
    the latent box bounds (B, ...), scaled by ``gradient_scale``."""
    return _GradientLink.apply(point.detach(), latent.lower, latent.upper, gradient_scale)


def _target_margin(logits: Tensor, label_and_target: Tensor) -> Tensor:
    """z_t - z_y for the (label, target) pair of each row."""
    labels, targets = label_and_target[:, 0], label_and_target[:, 1]
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.gather(1, labels[:, None]).squeeze(1)


def taps_loss(method: Method, step: StepInputs, box: Box, options: TapsOptions) -> RobustLoss:
    split = split_index(step.ops, options.classifier_size)
    extractor, head, attack_head = step.ops[:split], step.ops[split:], step.attack_ops[split:]
    latent = interval_bounds(extractor, box)[-1]
    labels, classes = step.labels, step.num_classes
    batch = labels.shape[0]
    others = torch.arange(classes, device=labels.device).expand(batch, classes)
    targets = others[others != labels[:, None]].view(batch, classes - 1)
    pairs = torch.stack([labels[:, None].expand_as(targets), targets], dim=2).flatten(0, 1)
    settings = method.attack_settings(latent_step_fraction(method.config.attack.steps))
    points = margin_pgd(tuple(attack_head), latent.detach(), labels, targets, settings)
    head_input = linked_point(points, latent, options.gradient_scale).flatten(0, 1)
    head_logits = run_ops(flatten_in_memory_order(tuple(head), head_input[:2]), head_input)
    margins = -_target_margin(head_logits, pairs).view(batch, classes - 1)  # z_y - z_t
    margin_lower = torch.zeros(batch, classes, dtype=margins.dtype, device=margins.device)
    margin_lower = margin_lower.scatter(1, targets, margins)
    taps = F.cross_entropy(worst_case_logits(margin_lower), labels)
    ibp_margins, _ = ibp_margin_lower(head, latent, labels)
    ibp = F.cross_entropy(worst_case_logits(ibp_margins), labels)
    estimated_robust = (margins > 0).all(dim=1).float().mean().item()
    return RobustLoss(taps * ibp, {"taps_loss": taps.item(), "ibp_loss": ibp.item(), "taps_robust": estimated_robust})


@METHODS.register("taps")
class TAPS(Method):
    Options = TapsOptions

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        split_index(step.ops, self.options.classifier_size)  # a network TAPS cannot split fails at once
        if step.eps < step.eps_target:
            return ibp_loss(step, step.box())
        return taps_loss(self, step, step.box(), self.options)
