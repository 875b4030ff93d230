"""Data-parallel training over torch.distributed: ``torchrun --nproc-per-node N -m ctbench train ...``.

One model is trained with every global batch split over the ranks, and a step on N ranks
equals the step of one process on the whole batch:

* BatchNorm: the clean pass normalizes with the statistics of the global batch. Each rank sums
  x and x^2 (in float64) and counts its samples per channel; one differentiable all_reduce
  (``differentiable_sum``: its backward all-reduces the gradients, as in SyncBatchNorm) gives
  the global mean and variance, and gradients flow back through it to every rank's activations.
  Shi et al.'s warm-up regularizer, a function of batch means, reduces its sums the same way.
  Attacks stay local.
* Loss: each rank scales its loss by its share of the global batch (local / global samples),
  so the sum over the ranks is the mean over the global batch (L1 counted once).
* Gradients: after the step's last backward pass, one all_reduce (sum) of the flattened
  gradients. Not DistributedDataParallel: ctbench runs the network through lowered ops
  (``models.ops``), never through the module's forward, which DDP needs to prepare each
  iteration, and a step has several backward passes (one per accumulation sub-batch, then one
  through the BatchNorm statistics), so the gradient is complete only after the last of them;
  DDP would reduce after each. Every rank then holds the same gradient and takes the same
  optimizer step (gradient clipping sees the global gradient).

Rank 0 reads and writes the run folder; what it reads (a checkpoint to resume, the best
weights) is broadcast, and an error it meets is raised on every rank. Population BatchNorm
statistics and evaluations are computed sharded and summed, so all ranks agree.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch import Tensor, nn

from ..attacks import PGDSettings
from ..data import Split
from ..data.common import contiguous_part
from ..evaluation import EvaluationResult, describe_attack, evaluate

T = TypeVar("T")

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def differentiable_sum(tensor: Tensor) -> Tensor:
    """all_reduce (sum) whose backward all-reduces the gradients: torch's functional collective
    where it has autograd, else torch.distributed.nn's (deprecated since)."""
    if hasattr(functional_collectives, "all_reduce_backward"):
        return functional_collectives.wait_tensor(functional_collectives.all_reduce(tensor, "sum", dist.group.WORLD))
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a torchrun (or other env://) launch."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks, with the reductions a data-parallel step needs."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): the part of every batch this rank trains on (``iterate_batches``)."""
        return self.rank, self.world_size

    def part(self, size: int) -> slice:
        """This rank's contiguous part of ``size`` items."""
        return contiguous_part(size, self.rank, self.world_size)

    def total(self, sums: Tensor) -> Tensor:
        """Sums over all ranks, differentiable (its backward sums the gradients over the ranks)."""
        return differentiable_sum(sums)

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and biased variance of ``x`` over every dim but 1 and over all ranks."""
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        local = torch.stack([count, x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64)])
        count, sums, squares = self.total(local)
        mean = sums / count
        variance = (squares / count - mean * mean).clamp(min=0)
        return mean.to(x.dtype), variance.to(x.dtype)

    def global_count(self, count: int) -> int:
        """The samples of all ranks, ``count`` of them on this one."""
        counts = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        return int(counts.item())

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its sum over the ranks, in one all_reduce. A parameter
        without a gradient counts as zero and gets the sum when any rank has a gradient."""
        parameters = [p for p in parameters if p.requires_grad]
        if not parameters:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]
                         + [torch.tensor([p.grad is not None for p in parameters], dtype=parameters[0].dtype,
                                         device=parameters[0].device)])
        dist.all_reduce(flat)
        *gradients, present = flat.split([p.numel() for p in parameters] + [len(parameters)])
        for parameter, gradient, any_rank_has_one in zip(parameters, gradients, present.tolist()):
            if any_rank_has_one:
                parameter.grad = gradient.view_as(parameter)

    def mean_of_metrics(self, metrics: dict[str, float], share: float) -> dict[str, float]:
        """The global-batch mean of per-rank batch means (each weighted by its rank's share)."""
        names = sorted(metrics)
        values = torch.tensor([metrics[name] * share for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(names, values.tolist()))

    def sum_counts(self, counts: list[float]) -> list[float]:
        values = torch.tensor(counts, dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return values.tolist()

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def from_main(self, produce: Callable[[], T]) -> T:
        """``produce()`` run on rank 0 only; its value is returned on every rank, and an
        exception it raises is raised on every rank."""
        message: list = [None]
        if self.is_main:
            try:
                message[0] = (produce(), None)
            except Exception as error:  # re-raised below, on every rank
                message[0] = (None, error)
        dist.broadcast_object_list(message, src=0, device=self._object_device())
        value, error = message[0]
        if error is not None:
            raise error
        return value

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def evaluate_sharded(parallel: DataParallel, model: nn.Module, split: Split, eps: float, device, batch_size: int,
                     attack: PGDSettings | None, crown_ibp: bool) -> EvaluationResult:
    """``evaluate`` of ``split``, each rank on its contiguous part, the counts summed over the
    ranks: every rank gets the result for the whole split."""
    part = split.subset(torch.arange(len(split))[parallel.part(len(split))])
    counts = [0.0, 0.0, 0.0, 0.0]  # correct, IBP-certified, robust to the attack, certified by IBP or CROWN-IBP
    if len(part):
        result = evaluate(model, part, eps, device, batch_size, attack=attack, crown_ibp=crown_ibp)
        fractions = (result.natural_accuracy, result.certified_accuracy, result.adversarial_accuracy,
                     result.crown_ibp_certified_accuracy)
        counts = [round((fraction or 0.0) * len(part)) for fraction in fractions]
    correct, certified, robust, tighter = (count / len(split) for count in parallel.sum_counts(counts))
    return EvaluationResult(len(split), eps, correct, certified, robust if attack is not None else None,
                            tighter if crown_ibp else None, describe_attack(attack))


def start_data_parallel(device: torch.device) -> DataParallel:
    """Join the torchrun job (env://): gloo on CPU; nccl on CUDA, each rank on its local GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def stop_data_parallel() -> None:
    """Leave the job. After a clean run the ranks first meet in a barrier: a rank that tore down
    its gloo connections while a peer still used them aborted the peer ("terminate called without
    an active exception"). A rank leaving on an exception skips it, so it cannot wait for a peer
    that will never come."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()
