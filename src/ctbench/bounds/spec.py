"""Specifications: the margins z_y - z_i that certification must prove positive."""
from __future__ import annotations

import torch
from torch import Tensor


def margin_spec(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """C with C[b, i] = e_{y_b} - e_i, shape (B, K, K); row i = y_b is zero (its margin is 0).

    Keeping the zero row makes every sample's spec the same shape; certification ignores it."""
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    return eye[labels].unsqueeze(1) - eye.unsqueeze(0)


def worst_case_logits(margin_lower: Tensor) -> Tensor:
    """Logits whose cross-entropy at label y upper-bounds the robust cross-entropy:
    entry i = -lb(z_y - z_i) >= z_i - z_y, entry y = 0 (Gowal et al. 2018)."""
    return -margin_lower


def is_certified(margin_lower: Tensor, labels: Tensor) -> Tensor:
    """A sample is certified when every margin other than its own label's is strictly positive."""
    others = margin_lower.clone()
    others.scatter_(1, labels.unsqueeze(1), float("inf"))
    return (others > 0).all(dim=1)
