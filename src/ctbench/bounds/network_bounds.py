"""Bounds on a model's outputs over an input box: the public ``ctbench.bounds.ibp`` and
``ctbench.bounds.crown``.

The model is lowered with its population BatchNorm statistics (as in evaluation), its
parameters detached; the box is cast to the dtype and device of the model's parameters. The
bounds are float computations of sound rules (every output for every input in the box lies
inside them up to floating-point rounding); ``ctbench.certify`` adds the rigorous
floating-point check that a certificate needs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.ops import lower_network, run_ops
from .box import Box
from .crown import alpha_crown_bounds, crown_bounds, crown_upper_bounds, intermediate_bounds
from .ibp import interval_bounds

INTERMEDIATE_MODES = {"crown": "crown", "ibp": "crown-ibp"}


def network_ibp(model: nn.Module, lower: Tensor, upper: Tensor) -> Box:
    """Interval bounds (IBP) of the model's outputs over the box [lower, upper] (shape (B, ...),
    a batch of boxes): a ``Box`` whose lower and upper have the shape of the outputs."""
    network, box = _lowered(model, lower, upper)
    with torch.no_grad():
        return interval_bounds(network, box)[-1]


def network_crown(model: nn.Module, lower: Tensor, upper: Tensor, *, intermediate: str = "crown",
                  alpha_iterations: int = 0) -> Box:
    """CROWN bounds of the model's outputs (B, K) over the box [lower, upper] (shape (B, ...)).

    ``intermediate``: how the inputs of the ReLUs are bounded, "crown" (CROWN, tightest) or
    "ibp" (CROWN-IBP, faster). ``alpha_iterations > 0``: alpha-CROWN, that many steps optimizing
    the lower ReLU slopes for each output bound (never looser than CROWN)."""
    if intermediate not in INTERMEDIATE_MODES:
        raise ValueError(f"intermediate must be one of {', '.join(INTERMEDIATE_MODES)}, got {intermediate!r}")
    network, box = _lowered(model, lower, upper)
    with torch.no_grad():
        outputs = run_ops(network, box.center[:1])
        if outputs.dim() != 2:
            raise ValueError(f"CROWN bounds a model with flat outputs (B, K); this one gives {tuple(outputs.shape)}")
        identity = torch.eye(outputs.shape[1], dtype=box.lower.dtype, device=box.lower.device)
        boxes = intermediate_bounds(network, box, INTERMEDIATE_MODES[intermediate])
    if alpha_iterations > 0:
        return Box(alpha_crown_bounds(network, box, identity, boxes, alpha_iterations),
                   -alpha_crown_bounds(network, box, -identity, boxes, alpha_iterations))
    with torch.no_grad():
        return Box(crown_bounds(network, box, identity, boxes), crown_upper_bounds(network, box, identity, boxes))


def _lowered(model: nn.Module, lower: Tensor, upper: Tensor):
    """The lowered model and the box, checked and cast to the model's dtype and device."""
    if lower.shape != upper.shape:
        raise ValueError(f"lower and upper must have one shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
    if lower.dim() < 2:
        raise ValueError(f"give a batch of boxes, shape (B, ...), e.g. lower[None] for one box; got "
                         f"{tuple(lower.shape)}")
    if not bool((lower <= upper).all()):
        raise ValueError("the box is empty where lower > upper; every bound holds vacuously there: swap them")
    parameter = next(model.parameters(), None)
    dtype, device = (torch.float32, lower.device) if parameter is None else (parameter.dtype, parameter.device)
    box = Box(lower.detach().to(dtype=dtype, device=device), upper.detach().to(dtype=dtype, device=device))
    return lower_network(model, detach=True), box
