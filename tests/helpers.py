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


POOLS = {"avg": lambda: torch.nn.AvgPool2d(2), "avg-overlap": lambda: torch.nn.AvgPool2d(3, 2, 1),
         "max": lambda: torch.nn.MaxPool2d(2), "max-overlap": lambda: torch.nn.MaxPool2d(3, 2, 1)}


class SmallDag(nn.Module):
    """A DAG with every traced op: Normalize, a conv stem (BatchNorm or Identity), a residual
    add, a concatenation of two branches, a flatten and a view back, a pooling (``POOLS``), a
    dropout (p = 0: the same in training mode), a view to flat features and a linear head.
    Input (2, 8, 8), 4 classes."""

    def __init__(self, pool: str, batch_norm: bool) -> None:
        super().__init__()
        self.normalize = Normalize((0.3, 0.5), (0.4, 0.7))
        self.stem = nn.Conv2d(2, 3, 3, 1, 1)
        self.norm = nn.BatchNorm2d(3) if batch_norm else nn.Identity()
        self.inner = nn.Conv2d(3, 3, 3, 1, 1)
        self.branch = nn.Conv2d(3, 2, 1)
        self.pool = POOLS[pool]()
        self.dropout = nn.Dropout(0.0)
        self.hidden = nn.Linear(5 * 4 * 4, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu(self.norm(self.stem(self.normalize(x))))
        h = torch.relu(self.inner(h) + h)
        h = torch.cat([torch.relu(self.branch(h)), h], dim=1)
        h = torch.flatten(h, 1).view(-1, 5, 8, 8)
        h = self.dropout(self.pool(h))
        h = h.view(h.size(0), -1)
        return self.head(torch.relu(self.hidden(h)))


def random_dag_network(seed: int, pool: str = "max", batch_norm: bool = True, dtype=torch.float64) -> SmallDag:
    """A ``SmallDag`` with random weights (and BatchNorm statistics), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = SmallDag(pool, batch_norm).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.6)
        if batch_norm:
            model.norm.running_mean.copy_(torch.randn(3, generator=generator, dtype=dtype))
            model.norm.running_var.copy_(torch.rand(3, generator=generator, dtype=dtype) + 0.3)
    return model.eval()


def conv_net(seed: int, classes: int = 3) -> nn.Sequential:
    """A small conv chain (Normalize, conv, BatchNorm with random statistics, two linear layers)
    on 5x5 images, random weights, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(Normalize((0.4,), (0.5,)), nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(18, 6), nn.ReLU(), nn.Linear(6, classes))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        model[2].running_mean.copy_(torch.randn(2, generator=generator) * 0.1)
        model[2].running_var.copy_(torch.rand(2, generator=generator) + 0.5)
    return model.eval()
