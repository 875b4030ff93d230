"""EDAC (Zhang et al. 2023): PGD training with an extra step that lowers adversarial certainty.

After PGD finds x*, the "adversarial certainty" (standard deviation of the logits at x*,
averaged over the batch) is differentiated with respect to the network's parameters, and the
parameters take one step of size ``certainty_step`` down that gradient. L_rob is the
cross-entropy at x* under these stepped parameters; its gradient flows back to the original
parameters (an extragradient step: the update is taken from the unperturbed point). The step
acts on the lowered network (BatchNorm as its per-channel affine map with this step's
statistics), so no module is modified.

Options: certainty_step (default 0.01).
Usage: ``ctbench train mnist-0.1/edac``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.ops import ChannelAffineOp, ConvOp, LinearOp, network_ops, run_ops, with_ops
from .base import METHODS, Method, RobustLoss, StepInputs
from .pgd import adversarial_point

_TRAINABLE = {LinearOp: ("weight", "bias"), ConvOp: ("weight", "bias"), ChannelAffineOp: ("scale", "shift")}


@dataclass(frozen=True)
class EdacOptions:
    certainty_step: float = 0.01

    def __post_init__(self) -> None:
        if self.certainty_step < 0:
            raise ValueError(f"method.certainty_step must be >= 0, got {self.certainty_step}")


def _tensors(ops):
    return [(index, name) for index, op in enumerate(ops) for name in _TRAINABLE.get(type(op), ())
            if getattr(op, name) is not None and getattr(op, name).requires_grad]


@METHODS.register("edac")
class EDAC(Method):
    Options = EdacOptions
    certified = False

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        point = adversarial_point(self, step)
        ops = network_ops(step.ops)
        slots = _tensors(ops)
        tensors = [getattr(ops[index], name) for index, name in slots]
        certainty = step.logits(point).std(dim=1).mean()
        gradients = torch.autograd.grad(certainty, tensors, retain_graph=True, allow_unused=True)
        stepped = list(ops)
        for (index, name), tensor, gradient in zip(slots, tensors, gradients):
            if gradient is not None:
                stepped[index] = dataclasses.replace(stepped[index], **{name: tensor - self.options.certainty_step * gradient.detach()})
        logits = run_ops(with_ops(step.ops, stepped), point)
        accuracy = (logits.argmax(1) == step.labels).float().mean().item()
        return RobustLoss(F.cross_entropy(logits, step.labels), {"pgd_accuracy": accuracy, "certainty": certainty.item()})
