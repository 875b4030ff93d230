"""One optimizer step for any method: (1 - w_rob) L_nat + w_rob L_rob + L_reg.

BatchNorm statistics are set once per step from the clean batch and every pass of the step
(attacks, bounds, TAPS points) uses them, gradients flowing through them. With gradient
accumulation the statistics come from the full batch: each sub-batch's loss is differentiated
with the statistics held as leaves, and their accumulated gradient is pushed back through the
clean forward pass once at the end, so the result equals the full-batch gradient.

In data-parallel training (``distributed``) the batch is one rank's part of the global batch:
the statistics (and the warm-up regularizer's batch means) are those of the global batch, the
loss is scaled by the rank's share of it, and the gradients are summed over the ranks, so every
rank ends the step with the gradient of the one-process step on the global batch. (The warm-up
regularizer is not a per-sample loss: under accumulation it is taken per sub-batch, in one
process as on N ranks.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bounds import interval_bounds, linf_box
from ..config import TrainConfig
from ..methods import Method, RobustLoss, StepInputs
from ..models.ops import (
    BatchNormStats, Network, Statistics, batch_statistics, clean_forward, lower_network, network_prefix, run_ops,
)
from .distributed import DataParallel
from .regularizers import l1_penalty, own_sums, shi_input_box, shi_warmup_penalty


@dataclass(frozen=True)
class StepSettings:
    eps: float
    eps_target: float
    num_classes: int


@dataclass(frozen=True)
class _BatchReduction:
    """How this process's batch joins the batch of the step: its share of the step's samples,
    the BatchNorm statistics (``clean_forward``), the sums of the regularizer's batch means
    (``shi_warmup_penalty``) and the number of accumulation sub-batches, the same on every rank."""

    share: float
    sub_batches: int
    statistics: Statistics = batch_statistics
    total: Callable[[Tensor], Tensor] = own_sums


def _one_process(config: TrainConfig, count: int) -> _BatchReduction:
    return _BatchReduction(1.0, min(config.optim.accumulation_steps, count))


def _rank_of(parallel: DataParallel, config: TrainConfig, count: int) -> _BatchReduction:
    """This rank's part of the global batch. Every rank splits into the same number of
    sub-batches (each holds at least global // world_size samples), as the regularizer's sums
    are reduced over the ranks once per sub-batch."""
    total = parallel.global_count(count)
    sub_batches = min(config.optim.accumulation_steps, total // parallel.world_size)
    return _BatchReduction(count / total, sub_batches, parallel.batch_statistics, parallel.total)


def _leaf_statistics(stats: BatchNormStats) -> BatchNormStats:
    return BatchNormStats({i: (m.detach().requires_grad_(m.requires_grad), v.detach().requires_grad_(v.requires_grad))
                           for i, (m, v) in stats.per_layer.items()})


def _sub_batch_loss(model: nn.Module, method: Method, config: TrainConfig, settings: StepSettings, images: Tensor,
                    labels: Tensor, stats: BatchNormStats | None, clean_logits: Tensor,
                    total: Callable[[Tensor], Tensor]) -> tuple[Tensor, dict]:
    """w_rob L_rob (+ the warm-up regularizer) of one (sub-)batch, and its metrics."""
    ops = lower_network(model, stats, fold=True)
    attack_ops = lower_network(model, stats.detached() if stats else None, detach=True, fold=True)
    step = StepInputs(model=model, inputs=images, labels=labels, eps=settings.eps, eps_target=settings.eps_target,
                      ops=ops, attack_ops=attack_ops,
                      clean_logits=clean_logits, bn_stats=stats, num_classes=settings.num_classes)
    robust = method.robust_loss(step)
    metrics = {"robust_loss": robust.loss.item(), **robust.metrics}
    loss = config.method.w_rob * robust.loss
    regularization = config.regularization
    if regularization.shi_weight > 0 and method.certified and settings.eps < settings.eps_target:
        penalty = _shi_penalty(model, ops, images, settings.eps, robust, config, total)
        loss = loss + regularization.shi_weight * (1 - settings.eps / settings.eps_target) * penalty
        metrics["shi_penalty"] = penalty.item()
    return loss, metrics


def _shi_penalty(model: nn.Module, ops: Network, images: Tensor, eps: float, robust: RobustLoss,
                 config: TrainConfig, total: Callable[[Tensor], Tensor]) -> Tensor:
    """Shi et al.'s regularizer on the box the method bounded (the eps box; SABR's small box),
    else on the eps box; eps at least 1e-6 (the reference)."""
    if robust.ibp_boxes is not None and eps >= 1e-6:
        box, boxes = robust.ibp_input_box, robust.ibp_boxes
    else:
        box = linf_box(images, max(eps, 1e-6))
        boxes = interval_bounds(network_prefix(ops, len(ops) - 1), box)
    regularization = config.regularization
    return shi_warmup_penalty(ops, shi_input_box(model, box, regularization.shi_input_space), boxes,
                              regularization.shi_tolerance, total)


def compute_step_gradients(model: nn.Module, method: Method, config: TrainConfig, settings: StepSettings,
                           images: Tensor, labels: Tensor, parallel: DataParallel | None = None) -> dict[str, float]:
    """Fill .grad of the parameters with the gradient of the step's loss; return metrics. With
    ``parallel``, ``images`` and ``labels`` are this rank's part of the global batch, and the
    gradient and metrics are those of the global batch, the same on every rank."""
    if parallel is None:
        return _batch_gradients(model, method, config, settings, images, labels, _one_process(config, len(labels)))
    reduction = _rank_of(parallel, config, len(labels))
    metrics = _batch_gradients(model, method, config, settings, images, labels, reduction)
    parallel.sum_gradients(model.parameters())
    return parallel.mean_of_metrics(metrics, reduction.share)


def _batch_gradients(model: nn.Module, method: Method, config: TrainConfig, settings: StepSettings, images: Tensor,
                     labels: Tensor, reduction: _BatchReduction) -> dict[str, float]:
    """Add to .grad the gradient of the step's loss scaled by this batch's share; return its metrics."""
    w_rob, share = config.method.w_rob, reduction.share
    clean_logits, stats = clean_forward(model, images, reduction.statistics)
    natural = F.cross_entropy(clean_logits, labels)
    metrics: dict[str, float] = {"natural_loss": natural.item(),
                                 "train_accuracy": (clean_logits.argmax(1) == labels).float().mean().item()}
    # terms that need no robust pass; with w_rob = 1 the natural loss does not contribute at all
    head = natural if settings.eps == 0 else ((1 - w_rob) * natural if w_rob < 1 else natural.new_zeros(()))
    if config.regularization.l1 > 0:
        head = head + config.regularization.l1 * l1_penalty(model)
    head = head * share
    if settings.eps == 0:  # standard epochs / start of the ramp: no perturbation, no robust term
        head.backward()
        return metrics
    chunks = config.optim.accumulation_steps
    if chunks == 1:
        loss, robust_metrics = _sub_batch_loss(model, method, config, settings, images, labels,
                                               stats if stats.per_layer else None, clean_logits, reduction.total)
        (head + loss * share).backward()
        return {**metrics, **robust_metrics}
    leaves = _leaf_statistics(stats)
    sums: dict[str, float] = {}
    for image_chunk, label_chunk in zip(images.tensor_split(reduction.sub_batches),
                                        labels.tensor_split(reduction.sub_batches)):
        ops_stats = leaves if leaves.per_layer else None
        chunk_logits = run_ops(lower_network(model, ops_stats), image_chunk)
        loss, chunk_metrics = _sub_batch_loss(model, method, config, settings, image_chunk, label_chunk,
                                              ops_stats, chunk_logits, reduction.total)
        (loss * (len(label_chunk) / len(labels) * share)).backward()
        for key, value in chunk_metrics.items():
            sums[key] = sums.get(key, 0.0) + value * len(label_chunk) / len(labels)
    tensors, gradients = [head], [torch.ones_like(head)]
    for index, (mean, var) in stats.per_layer.items():
        leaf_mean, leaf_var = leaves.per_layer[index]
        for tensor, leaf in ((mean, leaf_mean), (var, leaf_var)):
            if leaf.grad is not None:
                tensors.append(tensor)
                gradients.append(leaf.grad)
    torch.autograd.backward(tensors, gradients)
    return {**metrics, **sums}


def training_step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, config: TrainConfig,
                  settings: StepSettings, images: Tensor, labels: Tensor,
                  parallel: DataParallel | None = None) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    metrics = compute_step_gradients(model, method, config, settings, images, labels, parallel)
    if config.optim.grad_clip is not None:
        norm = nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        metrics["grad_norm"] = norm.item()
    optimizer.step()
    return metrics
