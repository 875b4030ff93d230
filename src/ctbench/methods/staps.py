"""STAPS (Mao et al. 2023): TAPS on SABR's small box.

The small box (radius eps_shrink x eps around a PGD point, inside the eps box) is the input
box of TAPS; during the eps warm-up it falls back to IBP on the small box (SABR), with SABR's
input attack and warm-up regularizer box.

Options: eps_shrink, relu_shrink, regularizer_box (as SABR), classifier_size, gradient_scale (as TAPS).
Usage: ``ctbench train mnist-0.1/staps``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..bounds import IBPOptions
from .base import METHODS, RobustLoss, StepInputs
from .ibp import ibp_loss
from .sabr import SABR, SabrOptions, regularized_box, small_box
from .taps import TapsOptions, split_index, taps_loss


@dataclass(frozen=True)
class StapsOptions(SabrOptions, TapsOptions):
    def __post_init__(self) -> None:
        SabrOptions.__post_init__(self)
        TapsOptions.__post_init__(self)


@METHODS.register("staps")
class STAPS(SABR):
    Options = StapsOptions

    def robust_loss(self, step: StepInputs) -> RobustLoss:
        split_index(step.ops, self.options.classifier_size)  # a network TAPS cannot split fails at once
        box = small_box(self, step, self.options.eps_shrink)
        if step.eps < step.eps_target:  # warm-up: SABR
            return regularized_box(ibp_loss(step, box, IBPOptions(self.options.relu_shrink)), self.options)
        return taps_loss(self, step, box, self.options)
