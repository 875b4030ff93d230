"""A small ResNet for certified training, registered as ``resnet_small``.

The shape of the small residual networks of the certified-training literature (the ResNet of
Wong et al. 2018 used by CROWN-IBP, and the resnet2b of the auto_LiRPA / VNN-COMP examples):
a conv stem, residual blocks of two 3x3 convs with ReLUs (a 1x1 strided conv on the shortcut
where the block downsamples), 2x2 average pooling, then a linear head. With ``batch_norm`` every
conv (and the hidden linear layer) is followed by BatchNorm. It is an ``nn.Sequential`` whose
blocks are ordinary modules, so ``lower_network`` traces it with torch.fx into a DAG.

On MNIST (28x28): stem 16 channels at 28x28, block 16 -> 16, block 16 -> 32 at 14x14, average
pooling to 7x7, Linear(1568, 100), Linear(100, 10); 0.18 M parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from .cnn import MODELS, InputSpec
from .layers import Normalize


def _norm(channels: int, batch_norm: bool, dims: int = 2) -> nn.Module:
    if not batch_norm:
        return nn.Identity()
    return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)


class ResidualBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut is the identity, or a 1x1
    conv (with BatchNorm) of the block's stride when the block changes the shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.norm1 = _norm(out_channels, batch_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, batch_norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, 0),
                                          _norm(out_channels, batch_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet_small")
def resnet_small(spec: InputSpec, batch_norm: bool) -> nn.Sequential:
    size = (spec.size + 1) // 2 // 2  # the second block halves the size, the pooling halves it again
    return nn.Sequential(
        Normalize(spec.mean, spec.std),
        nn.Conv2d(spec.channels, 16, 3, 1, 1), _norm(16, batch_norm), nn.ReLU(),
        ResidualBlock(16, 16, 1, batch_norm),
        ResidualBlock(16, 32, 2, batch_norm),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * size * size, 100), _norm(100, batch_norm, dims=1), nn.ReLU(),
        nn.Linear(100, spec.classes),
    )
