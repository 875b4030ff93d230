"""Loss fragmentation as the ratio of unstable neurons (paper section 5.1).

A neuron (one element of a ReLU input) is *unstable* in the L_inf box B(x, eps) (clamped to the
data range) when its pre-activation takes a positive value at some point of the box and a
non-positive value at another.

* Sampled (a lower bound of the true ratio): ``points`` (50 in the paper) inputs
  x + eps * clip(n, -1, 1), n ~ N(0, I), clamped to [0, 1]; a neuron counts as unstable when
  both a positive and a non-positive pre-activation are *seen*.
* IBP (an upper bound): the neuron's IBP pre-activation bounds satisfy l <= 0 < u. (This is
  "l < 0 < u" except for l == 0 exactly, which the sampled definition counts as non-positive;
  with it, sampled <= IBP holds neuron by neuron.)
* CROWN-IBP (a tighter upper bound): for each ReLU layer, CROWN back-substitution from that
  layer's pre-activation to the input, with the ReLUs before it relaxed using their IBP bounds
  (CROWN-IBP with the layer as output), intersected with the IBP bounds; same test l <= 0 < u.
  Only neurons that IBP leaves unstable are bounded (a neuron stable under IBP stays stable),
  in chunks of rows to bound memory. ``ctbench.bounds.crown.intermediate_bounds(mode=
  "crown-ibp")`` returns the IBP boxes (CROWN-IBP's intermediate bounds by definition), so this
  column is computed here.

Ratios are per ReLU layer (unstable / neurons of the layer) and in total (over all neurons of
the network), per sample, then averaged over samples. The network is lowered with the
model's population BatchNorm statistics.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Collection, Sequence

import numpy as np
import torch
from torch import Tensor

from ..bounds.box import Box, linf_box
from ..bounds.ibp import interval_bounds
from ..models.ops import ConvOp, LinearOp, Op, ReluOp
from .tightness import backward_rows, input_shapes
from .utilization import (ModelOrOps, layer_names, relu_analysis_inputs, relu_indices, relu_pre_activations,
                          to_float_images)

BOUNDS = ("ibp", "crown-ibp")
DEFAULT_MAX_ELEMENTS = 2 ** 24  # elements of one row tensor A in the CROWN-IBP pass


def noisy_points(x: Tensor, eps: float, points: int, generator: torch.Generator | None = None,
                 data_min: float = 0.0, data_max: float = 1.0) -> Tensor:
    """(points, *x.shape): x + eps * clip(N(0, 1), -1, 1), clamped to [data_min, data_max]."""
    noise_device = generator.device if generator is not None else x.device
    noise = torch.randn((points, *x.shape), generator=generator, dtype=x.dtype, device=noise_device).to(x.device)
    return (x.unsqueeze(0) + eps * noise.clamp(-1.0, 1.0)).clamp(data_min, data_max)


def sampled_unstable_masks(ops: Sequence[Op], x: Tensor, eps: float, points: int = 50,
                           generator: torch.Generator | None = None, points_per_pass: int = 10,
                           ) -> dict[int, Tensor]:
    """Boolean (B, *layer shape) per ReLU op index: seen both > 0 and <= 0 over the samples.

    All noise is drawn first (so the result does not depend on ``points_per_pass``); the
    forward passes then take ``points_per_pass`` points per sample at a time to bound memory."""
    batch = x.shape[0]
    samples = noisy_points(x, eps, points, generator)  # (points, B, ...)
    positive: dict[int, Tensor] = {}
    non_positive: dict[int, Tensor] = {}
    with torch.no_grad():
        for chunk in samples.split(max(1, points_per_pass)):
            pre = relu_pre_activations(ops, chunk.flatten(0, 1))
            for index, values in pre.items():
                values = values.view(len(chunk), batch, *values.shape[1:])
                seen_positive, seen_non_positive = (values > 0).any(0), (values <= 0).any(0)
                if index in positive:
                    positive[index] |= seen_positive
                    non_positive[index] |= seen_non_positive
                else:
                    positive[index], non_positive[index] = seen_positive, seen_non_positive
    return {index: positive[index] & non_positive[index] for index in positive}


def _unstable(box: Box) -> Tensor:
    return (box.lower <= 0) & (box.upper > 0)


def ibp_preactivation_boxes(ops: Sequence[Op], box: Box) -> dict[int, Box]:
    """IBP box of every ReLU input, keyed by the ReLU's op index."""
    relus = relu_indices(ops)
    if not relus:
        return {}
    with torch.no_grad():
        boxes = interval_bounds(ops[:relus[-1]], box)
    return {index: (box if index == 0 else boxes[index - 1]) for index in relus}


def ibp_unstable_masks(ops: Sequence[Op], box: Box) -> dict[int, Tensor]:
    """Boolean (B, *layer shape) per ReLU op index: IBP bounds l <= 0 < u."""
    return {index: _unstable(pre) for index, pre in ibp_preactivation_boxes(ops, box).items()}


def _relu_relaxation_rule(boxes: dict[int, Box]):
    """CROWN's ReLU rule for a lower bound of A . relu(h), with pre-activation bounds [l, u]:
    relu(h) >= alpha h (alpha = 1 if u > -l else 0 for unstable neurons) and
    relu(h) <= u / (u - l) (h - l); A+ takes the lower line, A- the upper line."""

    def rule(index: int, A: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        lower, upper = boxes[index].lower, boxes[index].upper
        active, inactive = lower >= 0, upper <= 0
        unstable = ~active & ~inactive
        width = torch.where(unstable, upper - lower, torch.ones_like(upper))
        upper_slope = torch.where(active, torch.ones_like(upper), torch.where(unstable, upper / width,
                                                                               torch.zeros_like(upper)))
        upper_intercept = torch.where(unstable, -upper_slope * lower, torch.zeros_like(upper))
        lower_slope = torch.where(active | (unstable & (upper > -lower)), torch.ones_like(upper),
                                  torch.zeros_like(upper))
        positive, negative = A.clamp(min=0), A.clamp(max=0)
        new_A = positive * lower_slope.unsqueeze(1) + negative * upper_slope.unsqueeze(1)
        if bias is not None:
            bias = bias + (negative * upper_intercept.unsqueeze(1)).flatten(2).sum(-1)
        return new_A, bias

    return rule


def crown_ibp_preactivation_boxes(ops: Sequence[Op], box: Box, max_elements: int = DEFAULT_MAX_ELEMENTS,
                                  ) -> dict[int, Box]:
    """CROWN-IBP box of every ReLU input (module docstring), keyed by the ReLU's op index."""
    ibp_boxes = ibp_preactivation_boxes(ops, box)
    shapes = input_shapes(ops, tuple(box.lower.shape[1:]))
    rule = _relu_relaxation_rule(ibp_boxes)
    center, radius = box.center, box.radius
    batch = box.lower.shape[0]
    result: dict[int, Box] = {}
    for index, pre in ibp_boxes.items():
        earlier = ops[:index]
        if (not any(isinstance(op, ReluOp) for op in earlier)
                and sum(isinstance(op, (LinearOp, ConvOp)) for op in earlier) <= 1):
            result[index] = pre  # one Linear/Conv among diagonal maps: IBP is already exact
            continue
        lower, upper = pre.lower.flatten(1).clone(), pre.upper.flatten(1).clone()
        chosen = ((lower <= 0) & (upper > 0)).any(0).nonzero().squeeze(1)
        if chosen.numel() == 0:
            result[index] = pre
            continue
        size = lower.shape[1]
        widest = max(math.prod(s) for s in shapes[:index + 1])
        rows_per_chunk = max(1, max_elements // (2 * batch * widest))
        for chunk in chosen.split(rows_per_chunk):
            rows = torch.zeros(batch, 2 * len(chunk), size, dtype=lower.dtype, device=lower.device)
            positions = torch.arange(len(chunk), device=lower.device)
            rows[:, positions, chunk] = 1.0
            rows[:, positions + len(chunk), chunk] = -1.0
            with torch.no_grad():
                A, bias = backward_rows(earlier, shapes[:index], rows.view(batch, 2 * len(chunk), *shapes[index]),
                                        rule, bias=torch.zeros(batch, 2 * len(chunk), dtype=lower.dtype,
                                                               device=lower.device))
                flat_A = A.flatten(2)  # min over the box of A . x + bias: A . c - |A| . r + bias
                bound = ((flat_A * center.flatten(1).unsqueeze(1)).sum(-1)
                         - (flat_A.abs() * radius.flatten(1).unsqueeze(1)).sum(-1) + bias)
            lower[:, chunk] = torch.maximum(lower[:, chunk], bound[:, :len(chunk)])
            upper[:, chunk] = torch.minimum(upper[:, chunk], -bound[:, len(chunk):])
        result[index] = Box(lower.view_as(pre.lower), upper.view_as(pre.upper))
    return result


def crown_ibp_unstable_masks(ops: Sequence[Op], box: Box, max_elements: int = DEFAULT_MAX_ELEMENTS,
                             ) -> dict[int, Tensor]:
    """Boolean (B, *layer shape) per ReLU op index: CROWN-IBP bounds l <= 0 < u."""
    return {index: _unstable(pre) for index, pre in crown_ibp_preactivation_boxes(ops, box, max_elements).items()}


@dataclass(frozen=True)
class FragmentationResult:
    """Unstable-neuron ratios at radius ``eps``, averaged over ``samples`` inputs: sampled (a
    lower bound), and the IBP and CROWN-IBP upper bounds (None when not computed)."""

    eps: float
    samples: int
    points: int
    layer_names: list[str]
    layer_sizes: list[int]
    sampled: list[float]
    sampled_total: float
    ibp: list[float] | None
    ibp_total: float | None
    crown_ibp: list[float] | None
    crown_ibp_total: float | None

    def as_dict(self) -> dict:
        return asdict(self)


class _RatioAccumulator:
    """Sums per-sample ratios (per layer and total) of boolean neuron masks."""

    def __init__(self, relus: list[int]) -> None:
        self.relus = relus
        self.layers = torch.zeros(len(relus), dtype=torch.float64)
        self.total = 0.0
        self.sizes: list[int] = []

    def add(self, masks: dict[int, Tensor]) -> None:
        counts = torch.stack([masks[index].flatten(1).sum(1).double().cpu() for index in self.relus])  # (L, B)
        self.sizes = [masks[index][0].numel() for index in self.relus]
        sizes = torch.tensor(self.sizes, dtype=torch.float64).unsqueeze(1)
        self.layers += (counts / sizes).sum(1)
        self.total += (counts.sum(0) / sizes.sum()).sum().item()


def unstable_neurons(model_or_ops: ModelOrOps, images: Tensor | np.ndarray, eps: float, *, points: int = 50,
                     generator: torch.Generator | None = None, bounds: Collection[str] = BOUNDS,
                     batch_size: int = 32, max_elements: int = DEFAULT_MAX_ELEMENTS) -> FragmentationResult:
    """Ratio of unstable neurons in the eps box around each input (module docstring).

    Args:
        model_or_ops: an ``nn.Sequential`` ctbench model (population BatchNorm statistics) or
            its lowered ops.
        images: (N, C, H, W), uint8 or floats in [0, 1].
        eps: L_inf radius in pixel space ([0, 1] scale), any value (not only the training one).
        points: sampled inputs per sample (50 in the paper).
        generator: torch generator for the noise; seed it for reproducible numbers.
        bounds: which upper bounds to compute, a subset of ("ibp", "crown-ibp"). CROWN-IBP costs
            about one backward pass per IBP-unstable neuron.
        batch_size: samples per pass (each is expanded to ``points`` inputs).
        max_elements: bound on the row tensor of the CROWN-IBP pass (memory).
    """
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise ValueError(f"unknown bounds {sorted(unknown)}; known: {', '.join(BOUNDS)}")
    ops, dtype, device, relus = relu_analysis_inputs(model_or_ops, images)
    count = len(images)
    sampled = _RatioAccumulator(relus)
    ibp = _RatioAccumulator(relus) if "ibp" in bounds else None
    crown_ibp = _RatioAccumulator(relus) if "crown-ibp" in bounds else None
    for start in range(0, count, batch_size):
        x = to_float_images(images[start:start + batch_size], dtype, device)
        sampled.add(sampled_unstable_masks(ops, x, eps, points, generator))
        box = linf_box(x, eps)
        if ibp is not None:
            ibp.add(ibp_unstable_masks(ops, box))
        if crown_ibp is not None:
            crown_ibp.add(crown_ibp_unstable_masks(ops, box, max_elements))

    def layers(acc: _RatioAccumulator | None) -> list[float] | None:
        return None if acc is None else (acc.layers / count).tolist()

    def total(acc: _RatioAccumulator | None) -> float | None:
        return None if acc is None else acc.total / count

    return FragmentationResult(float(eps), count, points, layer_names(ops), sampled.sizes,
                               layers(sampled), total(sampled), layers(ibp), total(ibp),
                               layers(crown_ibp), total(crown_ibp))
