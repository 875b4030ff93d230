"""Floating-point soundness of a "certified" verdict.

The bound stages run in float32 (fast, and what the network was trained in). A float32 bound
carries rounding error, and so would a plain float64 recomputation: with a neuron of 2^70 next
to a bias of 50, float64 absorbs the 50 and can report a positive margin where the exact one is
-48.95. So every certified verdict rests on a *rigorous* bound (``rigorous``): interval
arithmetic and CROWN in float64 with every rounding error bounded, so that the bound is <= the
exact real-valued one. The network certified is the real-valued function of the model's float32
parameters (``rigorous.interval_network``: BatchNorm with its population statistics and the
input normalization as per-channel intervals that contain their real parameters, never folded),
on the box rebuilt outward from the float32 input and eps (``rigorous.rigorous_box``):

1. ``ibp`` and ``crown-ibp``: a candidate (float32 bound > 0) is re-bounded rigorously: IBP with
   last-layer elision; CROWN with rigorous IBP intermediate bounds;
2. ``alpha-crown``: rigorous CROWN with the float32 run's optimized slopes (any slope in [0, 1]
   is sound, so reusing them costs one backward pass) and rigorous intermediate bounds (CROWN
   for the same layers, IBP for the others);
3. ``bab``: a domain is closed only when its rigorous bound (its splits, its slopes and its
   split multipliers beta, sound for any beta >= 0, rigorous intermediate bounds) exceeds the
   threshold. A leaf (no unstable neuron left in its rigorous bounds) is linear on its region
   and is decided by an LP whose data come from rigorous backward passes
   (``rigorous.backward``): for a split neuron j (sign s_j), -s_j h_j(x) >= a_j . x + c_j on the
   region, exactly, so every point of the real region satisfies the row a_j . x <= -c_j (the
   LP's region contains the real one), and the margin is >= g . x + g0 there. The solver only
   proposes multipliers; the leaf is closed by a Lagrangian bound evaluated rigorously
   (``lagrangian_lower_bound``), an empty region by a Farkas certificate evaluated the same way
   (``infeasibility_certificate``), so neither the folded/rounded network nor the solver's
   tolerances enter. (The ``milp`` stage only falsifies.)
4. the sample is certified only if every rigorous margin lower bound exceeds the safety
   threshold  ``atol + rtol * max_k |z_k(x)|``  (z: the float64 logits of the clean input),
   with ``atol = 1e-6`` and ``rtol = 1e-5`` by default (``SafetyMargin``); ``margin_lower`` of
   a certified verdict is the rigorous bound.

The threshold is not what makes the check sound (any rigorous bound > 0 is a proof about the
real network); it is an engineering margin: a relative term of 1e-5 (about 80 float32 ulps of
the largest logit) keeps a margin that the float32 forward pass of the deployed model could
flip by its own rounding from being reported as certified. It is not a proof about float32
execution. A margin of the order of float32 epsilon (1e-7 relative) is never certified; only
samples whose best bound lies within the threshold of 0 are affected (such a sample ends
"unknown" unless an attack falsifies it).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from typing import Mapping

import torch
from torch import Tensor, nn

from ..bounds.box import Box
from ..bounds.spec import margin_spec
from ..models.ops import Network, Op, lower_network, network_ops, run_ops, with_ops
from .rigorous import ETA, concretize, dot_upper, gamma, inflate, next_down, next_up


@dataclass(frozen=True)
class SafetyMargin:
    """Certified means: rigorous margin lower bound > atol + rtol * max_k |z_k(clean x)| (an
    engineering margin on top of the proof, see the module docstring)."""

    atol: float = 1e-6
    rtol: float = 1e-5

    def threshold(self, clean_logits: Tensor) -> Tensor:
        """Per-sample threshold (B,) from float64 clean logits (B, K)."""
        return self.atol + self.rtol * clean_logits.detach().abs().amax(dim=1).to(torch.float64)


# ----------------------------------------------------------------------------------------------
# float64 network and box


def _op_to(op: Op, dtype: torch.dtype, device: torch.device | str | None) -> Op:
    changes = {}
    for item in fields(op):
        value = getattr(op, item.name)
        if isinstance(value, Tensor):
            changes[item.name] = value.detach().to(dtype=dtype, device=device or value.device)
    return replace(op, **changes) if changes else op


def ops_to(ops: Network, dtype: torch.dtype, device: torch.device | str | None = None) -> Network:
    """The same network with every tensor field of its ops cast to ``dtype`` (and moved to
    ``device``)."""
    return with_ops(ops, [_op_to(op, dtype, device) for op in network_ops(ops)])


def float64_ops(model: nn.Module) -> Network:
    """The model lowered in float64 (population BatchNorm statistics), parameters detached."""
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    return lower_network(model64, detach=True)


def float64_box(x: Tensor, eps: float, data_range: tuple[float, float]) -> Box:
    x64 = x.detach().to(torch.float64)
    lo, hi = data_range
    return Box((x64 - eps).clamp(min=lo), (x64 + eps).clamp(max=hi))


def clean_logits64(ops64: Network, x: Tensor) -> Tensor:
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
# Intermediate bounds


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


def lagrangian_lower_bound(objective: Tensor, offset: float, constraint_matrix: Tensor, constraint_rhs: Tensor,
                           multipliers: Tensor, lower: Tensor, upper: Tensor) -> float:
    """A rigorous lower bound of  min objective . x + offset  s.t.  G x <= rhs, lower <= x <= upper,
    for any multipliers lambda (clamped to >= 0; weak duality):

        min_{x in box} (g + G^T lambda) . x + offset - lambda . rhs,

    evaluated with the error model of ``rigorous``: v = fl(g + G^T lambda) (m rows) differs from
    the exact coefficients by at most E = gamma_{m+1} (|g| + |G|^T lambda) + (m+1) eta, which
    costs E . max(|lower|, |upper|); the minimum of v . x is ``rigorous.concretize``'s; and
    lambda . rhs <= fl(lambda . rhs) + gamma_m lambda . |rhs| + m eta. NaN gives -inf."""
    lam = multipliers.to(torch.float64).clamp(min=0)
    G, rhs, g = constraint_matrix.to(torch.float64), constraint_rhs.to(torch.float64), objective.to(torch.float64)
    rows, n = G.shape
    coefficients = g + G.T @ lam
    error = inflate(gamma(rows + 1) * (dot_upper(G.abs().T @ lam, rows) + g.abs()) + (rows + 1) * ETA)
    lower, upper = lower.to(torch.float64).view(1, n), upper.to(torch.float64).view(1, n)
    slack = dot_upper(error @ torch.maximum(lower.abs(), upper.abs())[0], n)
    rhs_upper = next_up(lam @ rhs + inflate(gamma(rows) * dot_upper(lam @ rhs.abs(), rows) + rows * ETA))
    box_min = concretize(coefficients.view(1, 1, n), torch.tensor([[offset]], dtype=torch.float64, device=g.device),
                         Box(lower, upper))[0, 0]
    value = next_down(next_down(box_min - slack) - rhs_upper)
    return float(value.nan_to_num(-math.inf, math.inf, -math.inf))


def infeasibility_certificate(constraint_matrix: Tensor, constraint_rhs: Tensor, multipliers: Tensor,
                              lower: Tensor, upper: Tensor) -> float:
    """For lambda >= 0: a rigorous lower bound of min over the box of lambda . (G x - rhs) (the
    Lagrangian bound of the zero objective). Every x with G x <= rhs has lambda . (G x - rhs)
    <= 0, so a positive value proves that no x of the box satisfies G x <= rhs (Farkas);
    negative multipliers are clamped to 0."""
    zero = torch.zeros(constraint_matrix.shape[1], dtype=torch.float64, device=constraint_matrix.device)
    return lagrangian_lower_bound(zero, 0.0, constraint_matrix, constraint_rhs, multipliers, lower, upper)
