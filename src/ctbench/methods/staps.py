"""STAPS (Mao et al. 2023): TAPS on SABR's small box.

The small box (radius eps_shrink x eps around a PGD point, inside the eps box) is the input
box of TAPS; during the eps warm-up it falls back to IBP on the small box (SABR).

Options: eps_shrink, relu_shrink (as SABR), classifier_size, gradient_scale (as TAPS).
Usage: ``ctbench train mnist-0.1/staps``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..bounds import IBPOptions
from .base import METHODS, Method, RobustLoss, StepInputs
from .ibp import ibp_loss
from .sabr import SabrOptions, small_box
from .taps import TapsOptions, taps_loss


@dataclass(frozen=True)
class StapsOptions(SabrOptions, TapsOptions):
    def __post_init__(self) -> None:
        SabrOptions.__post_init__(self)
        TapsOptions.__post_init__(self)


@METHODS.register("staps")
class STAPS(Method):
    Options = StapsOptions

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        box = small_box(self, step, self.options.eps_shrink)
        if step.eps < step.eps_target:  # warm-up: SABR (small-box bounds are not the regularizer's)
            warmup = ibp_loss(step, box, IBPOptions(self.options.relu_shrink))
            return RobustLoss(warmup.loss, warmup.metrics)
        return taps_loss(self, step, box, self.options)
