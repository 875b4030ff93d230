"""Small random networks and boxes shared by the tests."""
from __future__ import annotations

import torch
from torch import nn

from ctbench.models import Normalize


def random_network(seed: int, dtype=torch.float64, batch_norm_mode: str = "eval") -> nn.Sequential:
    """A small net with every supported layer type: Normalize, Conv2d (stride 2, padding),
    BatchNorm2d, ReLU, Identity, Dropout, Flatten, Linear, BatchNorm1d. BatchNorm layers get
    random affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        Normalize((0.3, 0.5), (0.4, 0.7)),
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=1, padding=1), nn.Identity(), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(3 * 4 * 4, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 5),
    ).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.6)
        for layer in model:
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator, dtype=dtype))
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator, dtype=dtype) + 0.3)
    return model.eval()


def random_inputs(seed: int, batch: int = 3, dtype=torch.float64) -> torch.Tensor:
    return torch.rand((batch, 2, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=dtype)
