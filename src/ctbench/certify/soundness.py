"""Floating-point soundness of a "certified" verdict.

The bound stages run in float32 (fast, and what the network was trained in). A float32 bound
carries rounding error: a margin lower bound of +1e-8 computed in float32 says nothing about
the sign of the real margin. So the final decision for every certified sample is re-done here:

1. the model is lowered again with every parameter cast to float64 (``float64_ops``: the same
   population BatchNorm statistics, folded in float64); the network being certified is this
   real-valued function of the float32 parameters;
2. the box is rebuilt in float64 from the float32 input and the float eps:
   [max(x - eps, lo), min(x + eps, hi)]; rounding to nearest can only move a face of the box
   outwards past no float64 point of the real box, so every float32 (and float64) point within
   eps of x is inside it;
3. the certifying stage's bound is recomputed in float64 on that box: IBP; CROWN-IBP;
   CROWN with the float32 run's optimized alpha slopes (any slopes in [0, 1] are sound, so
   reusing them costs one backward pass) and intermediate bounds recomputed in float64; for
   branch and bound every closed domain is re-bounded in float64 the same way (its splits, its
   slopes and its split multipliers beta, which are sound for any value >= 0), and a leaf closed
   by an LP is closed by a Lagrangian (dual) bound evaluated in float64
   (``lagrangian_lower_bound``), so the LP solver's tolerances do not enter; the ``milp`` stage
   is the exception: its certificate is HiGHS' optimum (tolerances 1e-9), see ``milp``;
4. the sample is certified only if every recomputed margin lower bound exceeds the safety
   threshold  ``atol + rtol * max_k |z_k(x)|``  (z: the float64 logits of the clean input),
   with ``atol = 1e-6`` and ``rtol = 1e-5`` by default (``SafetyMargin``).

Why these numbers: float64 rounding in the recomputation is about 1e-16 relative, far below
1e-6; the threshold is there so that a certificate is not a statement about rounding noise. A
relative term of 1e-5 (about 80 float32 ulps of the largest logit) keeps a margin that the
float32 forward pass of the deployed model could flip by its own rounding from being reported
as certified in practice; it is not a proof about float32 execution (that would need interval
arithmetic with directed rounding through every layer). A margin of the order of float32
epsilon (1e-7 relative) is never certified. Only samples whose best bound lies within the
threshold of 0 are affected (such a sample ends "unknown" unless an attack falsifies it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..bounds.box import Box
from ..bounds.crown import crown_bounds, crown_ibp_margin_lower, intermediate_bounds
from ..bounds.ibp import ibp_margin_lower
from ..bounds.spec import margin_spec
from ..models.ops import Op, lower_network, run_ops


@dataclass(frozen=True)
class SafetyMargin:
    """Certified means: float64 margin lower bound > atol + rtol * max_k |z_k(clean x)|."""

    atol: float = 1e-6
    rtol: float = 1e-5

    def threshold(self, clean_logits: Tensor) -> Tensor:
        """Per-sample threshold (B,) from float64 clean logits (B, K)."""
        return self.atol + self.rtol * clean_logits.detach().abs().amax(dim=1).to(torch.float64)


# ----------------------------------------------------------------------------------------------
# float64 network and box


def ops_to(ops: Sequence[Op], dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[Op, ...]:
    """The same ops with every tensor field cast to ``dtype`` (and moved to ``device``)."""
    result = []
    for op in ops:
        changes = {}
        for item in fields(op):
            value = getattr(op, item.name)
            if isinstance(value, Tensor):
                changes[item.name] = value.detach().to(dtype=dtype, device=device or value.device)
        result.append(replace(op, **changes) if changes else op)
    return tuple(result)


def float64_ops(model: nn.Module) -> tuple[Op, ...]:
    """The model lowered in float64 (population BatchNorm statistics), parameters detached."""
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    return lower_network(model64, detach=True)


def float64_box(x: Tensor, eps: float, data_range: tuple[float, float]) -> Box:
    x64 = x.detach().to(torch.float64)
    lo, hi = data_range
    return Box((x64 - eps).clamp(min=lo), (x64 + eps).clamp(max=hi))


def clean_logits64(ops64: Sequence[Op], x: Tensor) -> Tensor:
    with torch.no_grad():
        return run_ops(ops64, x.detach().to(torch.float64))


def min_other(margins: Tensor, labels: Tensor) -> Tensor:
    """min_{i != y} of a (B, K) margin tensor (entry y ignored), shape (B,)."""
    others = margins.clone()
    others.scatter_(1, labels.unsqueeze(1), float("inf"))
    return others.amin(dim=1)


# ----------------------------------------------------------------------------------------------
# Specifications over the other classes


def other_classes(labels: Tensor, num_classes: int) -> Tensor:
    """(B, K-1): every class but the label, increasing."""
    classes = torch.arange(num_classes, device=labels.device).expand(labels.shape[0], -1)
    return classes[classes != labels.unsqueeze(1)].view(labels.shape[0], num_classes - 1)


def margin_rows(labels: Tensor, num_classes: int, dtype: torch.dtype, targets: Tensor | None = None) -> Tensor:
    """Spec rows e_y - e_t, (B, S, K): for t in ``targets`` (B, S), else every t != y."""
    if targets is None:
        targets = other_classes(labels, num_classes)
    spec = margin_spec(labels, num_classes, dtype=dtype).to(labels.device)  # (B, K, K), row i: e_y - e_i
    return spec.gather(1, targets.unsqueeze(-1).expand(-1, -1, num_classes))


def scatter_rows(rows: Tensor, labels: Tensor, num_classes: int, targets: Tensor | None = None,
                 fill: float = 0.0) -> Tensor:
    """(B, S) bounds of the rows ``targets`` back into (B, K) margins; other entries ``fill``."""
    if targets is None:
        targets = other_classes(labels, num_classes)
    out = torch.full((labels.shape[0], num_classes), fill, dtype=rows.dtype, device=rows.device)
    return out.scatter(1, targets, rows)


# ----------------------------------------------------------------------------------------------
# float64 recomputation of each stage's bound


def ibp_margins64(ops64: Sequence[Op], box64: Box, labels: Tensor) -> Tensor:
    with torch.no_grad():
        return ibp_margin_lower(ops64, box64, labels)[0]


def crown_ibp_margins64(ops64: Sequence[Op], box64: Box, labels: Tensor, num_classes: int) -> Tensor:
    with torch.no_grad():
        return crown_ibp_margin_lower(ops64, box64, labels, num_classes)


def crown_rows64(ops64: Sequence[Op], box64: Box, spec: Tensor, alphas: Mapping[int, Tensor] | None, *,
                 mode: str = "crown", crown_layers: Collection[int] | None = None,
                 split: Mapping[int, Tensor] | None = None,
                 root_intermediate: Mapping[int, Box] | None = None) -> Tensor:
    """CROWN lower bounds (B, S) of spec rows in float64, with float64 intermediate bounds
    (``mode``, ``crown_layers``, ``split``; intersected with ``root_intermediate`` when given,
    bounds valid on the whole box) and the given lower slopes cast to float64."""
    with torch.no_grad():
        intermediate = intermediate_bounds(ops64, box64, mode, split=split, crown_layers=crown_layers)
        if root_intermediate is not None:
            intermediate = intersect_intermediate(intermediate, root_intermediate)
        alphas64 = {index: alpha.detach().to(device=box64.lower.device, dtype=torch.float64)
                    for index, alpha in (alphas or {}).items()}
        return crown_bounds(ops64, box64, spec.to(torch.float64), intermediate, alphas64)


def intersect_intermediate(intermediate: Mapping[int, Box], other: Mapping[int, Box]) -> dict[int, Box]:
    """Elementwise intersection of two sets of sound ReLU-input boxes (batch dims broadcast)."""
    result = {}
    for index, pre in intermediate.items():
        if index in other:
            extra = other[index]
            pre = Box(torch.maximum(pre.lower, extra.lower.to(pre.lower)),
                      torch.minimum(pre.upper, extra.upper.to(pre.upper)))
        result[index] = pre
    return result


# ----------------------------------------------------------------------------------------------
# Lagrangian bounds for LP-closed regions


def box_min_linear(coefficients: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """min over lower <= x <= upper of coefficients . x (1-D float64 tensors)."""
    return torch.where(coefficients >= 0, coefficients * lower, coefficients * upper).sum()


def lagrangian_lower_bound(objective: Tensor, offset: float, constraint_matrix: Tensor, constraint_rhs: Tensor,
                           multipliers: Tensor, lower: Tensor, upper: Tensor) -> float:
    """A sound lower bound of  min objective . x + offset  s.t.  constraint_matrix x <= rhs,
    lower <= x <= upper, for any multipliers >= 0 (weak duality, evaluated in float64):

        min_{x in box} (objective + G^T lambda) . x + offset - lambda . rhs.

    Negative multipliers are clamped to 0, so any input gives a valid bound."""
    lam = multipliers.to(torch.float64).clamp(min=0)
    coefficients = objective.to(torch.float64) + constraint_matrix.to(torch.float64).T @ lam
    value = box_min_linear(coefficients, lower.to(torch.float64), upper.to(torch.float64))
    return float(value + offset - lam @ constraint_rhs.to(torch.float64))


def infeasibility_certificate(constraint_matrix: Tensor, constraint_rhs: Tensor, multipliers: Tensor,
                              lower: Tensor, upper: Tensor) -> float:
    """For lambda >= 0: min over the box of lambda . (G x - rhs). Every x with G x <= rhs has
    lambda . (G x - rhs) <= 0, so a positive value proves that no x of the box satisfies
    G x <= rhs (Farkas); negative multipliers are clamped to 0."""
    lam = multipliers.to(torch.float64).clamp(min=0)
    coefficients = constraint_matrix.to(torch.float64).T @ lam
    return float(box_min_linear(coefficients, lower.to(torch.float64), upper.to(torch.float64))
                 - lam @ constraint_rhs.to(torch.float64))
