"""The contract of a training method: a robust loss for one (sub-)batch.

The Trainer owns everything shared: the clean forward pass that fixes the BatchNorm
statistics of the step, the natural loss, (1 - w_rob) L_nat + w_rob L_rob + L_reg, the
regularizers and the optimizer. A method only turns a batch into L_rob.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from ..attacks import PGDSettings
from ..attacks.input_ops import input_attack_ops
from ..bounds import Box, linf_box
from ..models.ops import BatchNormStats, Op, is_dag, run_ops
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass(frozen=True, eq=False)
class StepInputs:
    """What a method sees of one training (sub-)batch.

    ``ops`` is the network lowered with the clean-batch BatchNorm statistics of this step (the
    parameters and statistics keep their gradients); ``attack_ops`` is the same network with
    everything detached, for attacks that need gradients only with respect to their input."""

    model: nn.Module
    inputs: Tensor
    labels: Tensor
    eps: float
    eps_target: float
    ops: tuple[Op, ...]
    attack_ops: tuple[Op, ...]
    clean_logits: Tensor
    bn_stats: BatchNormStats | None
    num_classes: int

    def box(self, radius: float | None = None) -> Box:
        return linf_box(self.inputs, self.eps if radius is None else radius)

    def logits(self, x: Tensor) -> Tensor:
        return run_ops(self.ops, x)

    def attack_logits(self, x: Tensor) -> Tensor:
        return run_ops(self._input_attack_ops, x)

    @cached_property
    def _input_attack_ops(self) -> tuple[Op, ...]:
        """``attack_ops`` of a chain rewritten for speed, the same function (``input_attack_ops``)."""
        return self.attack_ops if is_dag(self.attack_ops) else input_attack_ops(self.attack_ops, self.inputs[:2])


@dataclass
class RobustLoss:
    """L_rob of a batch, with named metrics for the log. ``ibp_boxes`` are the IBP boxes of
    ``ibp_input_box`` after every op but the last, when the method computed them, so the warm-up
    regularizer can reuse them instead of propagating again (and, for SABR, measure the box
    the method bounded, as the reference does)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    ibp_boxes: list[Box] | None = None
    ibp_input_box: Box | None = None


@dataclass(frozen=True)
class NoOptions:
    pass


class Method:
    """Base class. Subclasses set ``Options`` (a frozen dataclass of their hyper-parameters)
    and ``certified`` (IBP init and certified-accuracy model selection), and implement
    ``robust_loss``."""

    Options: ClassVar[type] = NoOptions
    certified: ClassVar[bool] = True
    # Whether the loss is a sum of independent per-sample terms once the BatchNorm statistics
    # are fixed (then gradient accumulation equals the full batch exactly).
    per_sample_loss: ClassVar[bool] = True
    # Whether training runs the config's attack (attack.*); without one, attack.precision changes nothing.
    trains_with_attacks: ClassVar[bool] = True

    def __init__(self, options, config: "TrainConfig") -> None:
        self.options = options
        self.config = config

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        raise NotImplementedError

    def reference_step_fraction(self, steps: int) -> float:
        """The reference's sign step as a fraction of the box's half-width when attack.step_size
        is unset: max(0.25, 2/steps) for its PGD, MTL-IBP and EDAC attacks (one step reaches a face)."""
        return max(0.25, 2 / max(steps, 1))

    def attack_settings(self, reference_fraction: float | None = None) -> PGDSettings:
        """The config's attack. An unset attack.step_size takes ``reference_fraction`` of the
        half-width (default: this method's), halved when steps are relative to the width."""
        attack = self.config.attack
        step_size = attack.step_size
        if step_size is None:
            fraction = self.reference_step_fraction(attack.steps) if reference_fraction is None else reference_fraction
            step_size = fraction if attack.step_relative_to == "half_width" else fraction / 2
        return PGDSettings(steps=attack.steps, restarts=attack.restarts, step_size=step_size,
                           step_relative_to=attack.step_relative_to, step_schedule=attack.step_schedule,
                           step_decay=attack.step_decay, decay_at=attack.decay_at,
                           random_start=attack.random_start, precision=attack.precision)


METHODS: Registry[type[Method]] = Registry("method", key="method.name", plugin_group="ctbench.methods")
