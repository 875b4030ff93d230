"""Population BatchNorm statistics (Wu & Johnson 2021) for evaluation.

The running average lags behind the weights; after each epoch the statistics of every
BatchNorm layer are recomputed over the training data with the current weights: the
population mean is the mean of the batch means, the population variance the mean of the batch
variances plus the variance of the batch means (the law of total variance).
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import Split, iterate_batches
from ..models.ops import BATCHNORM_TYPES, clean_forward


@torch.no_grad()
def recompute_population_statistics(model: nn.Module, split: Split, batch_size: int, device,
                                    max_batches: int | None = None) -> None:
    layers = {i: m for i, m in enumerate(model) if isinstance(m, BATCHNORM_TYPES)}
    if not layers:
        return
    sums = {i: [0.0, 0.0, 0.0] for i in layers}  # sum of means, of variances, of squared means
    count = 0
    for batch_index, (images, _) in enumerate(iterate_batches(split, batch_size, device)):
        if max_batches is not None and batch_index >= max_batches:
            break
        _, stats = clean_forward(model, images)
        for i, (mean, var) in stats.per_layer.items():
            sums[i][0] = sums[i][0] + mean
            sums[i][1] = sums[i][1] + var
            sums[i][2] = sums[i][2] + mean ** 2
        count += 1
    for i, layer in layers.items():
        mean = sums[i][0] / count
        variance = sums[i][1] / count + (sums[i][2] / count - mean ** 2).clamp(min=0)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(variance)
