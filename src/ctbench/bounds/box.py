"""Boxes (interval bounds) as immutable values."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Box:
    """Elementwise bounds lower <= x <= upper of a batch of tensors."""

    lower: Tensor
    upper: Tensor

    @property
    def center(self) -> Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2

    @staticmethod
    def from_center_radius(center: Tensor, radius: Tensor) -> "Box":
        return Box(center - radius, center + radius)

    def detach(self) -> "Box":
        return Box(self.lower.detach(), self.upper.detach())

    def repeat(self, times: int, interleave: bool = False) -> "Box":
        """Every sample's box ``times`` times along the batch dim: the whole batch ``times`` over,
        or with ``interleave`` each sample's copies side by side. A channels-last batch stays
        channels-last, so that convolutions on the copies convert nothing."""

        def repeated(tensor: Tensor) -> Tensor:
            result = (tensor.repeat_interleave(times, 0) if interleave
                      else tensor.repeat(times, *([1] * (tensor.dim() - 1))))
            return result.contiguous(memory_format=box_memory_format(tensor))

        return Box(repeated(self.lower), repeated(self.upper))

    def contains(self, x: Tensor, tolerance: float = 0.0) -> Tensor:
        """Per-sample: is every element of x inside the box (up to ``tolerance``)?"""
        inside = (x >= self.lower - tolerance) & (x <= self.upper + tolerance)
        return inside.flatten(1).all(dim=1)


def box_memory_format(tensor: Tensor) -> torch.memory_format:
    """channels_last for a channels-last batch of images, else contiguous."""
    channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not tensor.is_contiguous() else torch.contiguous_format


def linf_box(x: Tensor, eps: float | Tensor, data_min: float = 0.0, data_max: float = 1.0) -> Box:
    """The L_inf ball of radius eps around x, clamped to the data range [data_min, data_max]."""
    return Box((x - eps).clamp(min=data_min), (x + eps).clamp(max=data_max))


def sample_in_box(box: Box, count: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` points per sample, uniform in the box, with the corners over-represented
    (a third of the coordinates snap to a face) because bounds are tightest to violate there.
    Shape: (count, *box.lower.shape)."""
    shape = (count, *box.lower.shape)
    u = torch.rand(shape, generator=generator, dtype=box.lower.dtype, device=box.lower.device)
    snap = torch.rand(shape, generator=generator, dtype=box.lower.dtype, device=box.lower.device)
    u = torch.where(snap < 1 / 6, torch.zeros_like(u), torch.where(snap < 1 / 3, torch.ones_like(u), u))
    return box.lower + u * (box.upper - box.lower)
