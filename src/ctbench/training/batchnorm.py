"""Population BatchNorm statistics (Wu & Johnson 2021) for evaluation.

The running average lags behind the weights; after each epoch the statistics of every
BatchNorm layer are recomputed over the training data with the current weights: the
population mean is the mean of the batch means, the population variance the mean of the batch
variances plus the variance of the batch means (the law of total variance).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..data import Split
from ..data.common import to_float
from ..models.ops import batchnorm_layers, clean_forward
from .distributed import DataParallel


@torch.no_grad()
def recompute_population_statistics(model: nn.Module, split: Split, batch_size: int, device,
                                    max_batches: int | None = None, parallel: DataParallel | None = None) -> None:
    """Set every BatchNorm's running statistics to the population statistics of ``split`` in
    batches of ``batch_size`` (the first ``max_batches`` of them). With ``parallel`` the ranks
    take turns over the batches and sum their moments, so all ranks set the same statistics."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    starts = list(range(0, len(split), batch_size))[:max_batches]
    rank, world_size = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    # per layer: sum of the batch means, of the batch variances, of the squared batch means
    moments = {i: layer.running_mean.new_zeros((3, *layer.running_mean.shape)) for i, layer in layers.items()}
    for start in starts[rank::world_size]:
        _, stats = clean_forward(model, to_float(split.images[start:start + batch_size], device))
        for i, (mean, var) in stats.per_layer.items():
            moments[i] += torch.stack([mean, var, mean ** 2]).to(moments[i].dtype)
    if parallel:
        flat = torch.cat([moments[i].flatten() for i in layers])
        dist.all_reduce(flat)
        moments = dict(zip(layers, (part.view(3, -1) for part in flat.split([moments[i].numel() for i in layers]))))
    count = len(starts)
    for i, layer in layers.items():
        mean = moments[i][0] / count
        variance = moments[i][1] / count + (moments[i][2] / count - mean ** 2).clamp(min=0)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(variance)
