"""PGD on the margins z_t - z_y of a chain of ops, with a hand-written input gradient: TAPS's latent attack.

TAPS attacks every margin of every sample inside the latent box: restarts x batch x (K-1)
points of the head (CNN7, batch 256: 6912 points of 25088 features, 0.7 GB a copy).
``pgd_attack`` would run them as one batch under autograd, and on a CPU most of the time beyond
the head's products went to memory: every step allocated and faulted in a fresh gradient of
that size, and autograd handed the ReLU and convolution of a channels-last head a contiguous
gradient after the Flatten, which both then ran through slow mixed-layout kernels. Here

* on a CPU the points run a chunk of samples at a time, in buffers allocated once and small
  enough that the chunk's temporaries reuse freed heap memory;
* the margin's gradient goes back through the ops by hand (one rule per op, seeded with
  e_t - e_y), each gradient in the memory format of its forward activation, a linear first op's
  written into a buffer; a Flatten of a channels-last activation becomes a view;
* the box is broadcast over targets, never copied; a step clamps once; iterates alternate
  between two buffers, so a best point is copied only when the margin stops growing;
* a head that starts with a strided convolution (CNN3's, CNN5's) is attacked in the phases of
  its input (``input_ops.phase_space_conv``): a stride-1 convolution, 3x faster in bfloat16;
  the start noise is drawn in the box's own layout and rearranged, so the starts are the same;
* under a reduced attack precision the iterates themselves are in it (half the memory traffic
  of every elementwise pass, and no conversion before each forward or after each sign); the
  points found are converted back and clamped into the box of the box's own precision.

It computes ``pgd_attack``'s result with the target margin as loss on the box repeated per
target: on a CPU the same random starts for the same seed, and iterates equal up to float
rounding (tests/test_taps_speed_equivalence.py).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bounds.box import Box, box_memory_format
from ..models.ops import ConvOp, FlattenOp, LinearOp, Op, ReluOp, ReshapeOp
from .input_ops import ChannelsLastFlattenOp, flatten_in_memory_order, phase_space_conv
from .pgd import PRECISIONS, PGDSettings, place_start, resolve_precision, step_sizes

# Latent values per chunk buffer: 32 MiB in float32, glibc's largest mmap threshold, so the
# chunk's temporaries come from reused heap memory instead of freshly faulted-in pages.
CHUNK_ELEMENTS = 2 ** 23
# Rows per chunk at least when the head starts with a linear op: its gradient product runs a
# quarter faster on 1000 rows than on 300, and such a head allocates nothing of the chunk's size
# per step (the product is written into a buffer).
LINEAR_CHUNK_ROWS = 1024


def _saved_for_gradient(op: Op, x: Tensor, y: Tensor) -> Any:
    """What the op's gradient rule needs from its forward x -> y: a ReLU its output, a Linear
    nothing, a flatten or reshape its input's shape (and memory format), any other op its input."""
    if isinstance(op, ReluOp):
        return y
    if isinstance(op, LinearOp):
        return None
    if isinstance(op, ChannelsLastFlattenOp):
        return x.shape
    if isinstance(op, (FlattenOp, ReshapeOp)):
        return x.shape, box_memory_format(x)
    return x


def _forward(ops: tuple[Op, ...], x: Tensor) -> tuple[Tensor, list[Any]]:
    """The logits, and what each op's gradient rule needs."""
    saved: list[Any] = []
    for op in ops:
        y = op(x)
        saved.append(_saved_for_gradient(op, x, y))
        x = y
    return x, saved


def _input_gradient(op: Op, saved: Any, grad: Tensor, out: Tensor | None = None) -> Tensor:
    """The gradient with respect to the op's input, from the gradient of its output (``out``:
    where to write a linear op's)."""
    if isinstance(op, LinearOp):
        return torch.mm(grad, op.weight, out=out) if out is not None else grad @ op.weight
    if isinstance(op, ReluOp):
        return torch.ops.aten.threshold_backward(grad, saved, 0)  # autograd's rule: grad where the output > 0
    if isinstance(op, ChannelsLastFlattenOp):
        batch, channels, height, width = saved
        return grad.view(batch, height, width, channels).permute(0, 3, 1, 2)
    if isinstance(op, (FlattenOp, ReshapeOp)):
        shape, memory_format = saved
        return grad.reshape(shape).contiguous(memory_format=memory_format)
    if isinstance(op, ConvOp):
        return torch.ops.aten.convolution_backward(grad, saved, op.weight, None, op.stride, op.padding, (1, 1),
                                                   False, (0, 0), 1, (True, False, False))[0]
    with torch.enable_grad():  # any other op: its own autograd rule
        x = saved.detach().requires_grad_()
        return torch.autograd.grad(op(x), x, grad)[0]


def _margin_gradient(ops: tuple[Op, ...], saved: list[Any], seed: Tensor, out: Tensor | None) -> Tensor:
    """The gradient of the margins with respect to the ops' input (``seed``: e_t - e_y per row;
    ``out``: where to write it when the first op is linear)."""
    grad = seed
    for index in range(len(ops) - 1, -1, -1):
        grad = _input_gradient(ops[index], saved[index], grad, out if index == 0 else None)
    return grad


def op_in_dtype(op: Op, dtype: torch.dtype) -> Op:
    """The op with its tensors (weights, biases, scales) cast to ``dtype``."""
    tensors = {field.name: getattr(op, field.name) for field in dataclasses.fields(op)}
    return dataclasses.replace(op, **{name: value.to(dtype) for name, value in tensors.items()
                                      if isinstance(value, Tensor)})


def _rows(mask: Tensor, ndim: int) -> Tensor:
    """A per-row mask viewed to broadcast over rows of ``ndim`` dims."""
    return mask.view(-1, *([1] * (ndim - 1)))


def _attack_chunk(ops: tuple[Op, ...], current: Tensor, spare: Tensor, best: Tensor, lower: Tensor, upper: Tensor,
                  labels: Tensor, targets: Tensor, sizes: list[float], gradient_out: Tensor | None) -> Tensor:
    """PGD from the start points in ``current`` (rows: samples x targets, the box per sample
    broadcast over targets; all in the ops' precision); the best point of each row (its start
    if no margin beats -inf) ends in ``best``, its float32 margin is returned.

    Iterates alternate between ``current`` and ``spare``, so the previous iterate survives one
    step: a row's best point is copied only when an iterate that improved it is followed by one
    that does not (rarely: the margin grows at almost every step), not at every step."""
    grid_shape = (lower.shape[0], -1, *lower.shape[2:])  # (samples, targets, *sample shape)
    width = upper - lower
    best_margin = torch.full((current.shape[0],), float("-inf"), dtype=torch.promote_types(lower.dtype, torch.float32),
                             device=lower.device)
    best_is_previous = torch.zeros_like(best_margin, dtype=torch.bool)  # held only in the previous iterate
    previous = spare
    best.copy_(current)
    for step_size in sizes + [None]:
        logits, saved = _forward(ops, current)
        scores = logits.float()  # pgd_attack ranks by the margin of float32 logits
        margin = (scores.gather(1, targets) - scores.gather(1, labels)).squeeze(1).to(best_margin.dtype)
        improved = margin > best_margin
        best_margin = torch.where(improved, margin, best_margin)
        stays = (best_is_previous & ~improved).nonzero().squeeze(1)
        if stays.numel():
            best.index_copy_(0, stays, previous.index_select(0, stays))
        best_is_previous = improved
        if step_size is None:
            break
        seed = torch.zeros_like(logits).scatter_(1, targets, 1.0).scatter_(1, labels, -1.0)
        direction = _margin_gradient(ops, saved, seed, gradient_out).sign_()
        following = previous.view(grid_shape)
        torch.addcmul(current.view(grid_shape), width, direction.view(grid_shape), value=step_size, out=following)
        following.clamp_(lower, upper)
        current, previous = previous, current
    torch.where(_rows(best_is_previous, current.dim()), current, best, out=best)
    return best_margin


def margin_pgd(ops: tuple[Op, ...], box: Box, labels: Tensor, targets: Tensor, settings: PGDSettings,
               generator: torch.Generator | None = None) -> Tensor:
    """For each sample b and each target targets[b, j], the point of box b with the highest
    margin z_t - z_y (t = targets[b, j], y = labels[b]) that PGD finds; shape (B, T, *box
    shape), detached. ``ops``: a chain of detached ops from the box's space to the logits.

    The points run restart by restart, a chunk of samples at a time, in the order in which
    ``pgd_attack`` lays them out (restart-major, then sample, then target): each chunk draws its
    start noise in turn, and the draws are those of one call over all points (CPU generators
    fill a tensor element by element in memory order). A later restart replaces a point only
    where its margin is strictly higher, as pgd_attack's argmax keeps the first best restart."""
    lower, upper = box.lower.detach(), box.upper.detach()
    batch, target_count = targets.shape
    box_shape = lower.shape[1:]
    memory_format, device = box_memory_format(lower), lower.device
    phase_conv = phase_space_conv(ops[0], lower.shape) if device.type == "cpu" else None
    stride = ops[0].stride[0] if phase_conv is not None else 1
    if phase_conv is not None:  # iterate the phases of the points
        ops = (phase_conv, *ops[1:])
        lower, upper = (F.pixel_unshuffle(bound, stride).contiguous(memory_format=memory_format)
                        for bound in (lower, upper))
    sample_shape = lower.shape[1:]
    first_is_linear = isinstance(ops[0], LinearOp) and len(sample_shape) == 1
    samples_per_chunk = max(1, CHUNK_ELEMENTS // (sample_shape.numel() * target_count),
                            -(-LINEAR_CHUNK_ROWS // target_count) if first_is_linear else 1)
    if device.type != "cpu":  # chunks work around CPU page faults and cache sizes; a GPU wants large kernels
        samples_per_chunk = batch
    chunk_rows = min(batch, samples_per_chunk) * target_count

    def chunk_buffer(dtype: torch.dtype) -> Tensor:
        return torch.empty((chunk_rows, *sample_shape), dtype=dtype, device=device, memory_format=memory_format)

    dtype = PRECISIONS[resolve_precision(settings.precision, device)] or lower.dtype
    current_buffer, spare_buffer, best_buffer = chunk_buffer(dtype), chunk_buffer(dtype), chunk_buffer(dtype)
    compute_ops = tuple(ops) if dtype == lower.dtype else tuple(op_in_dtype(op, dtype) for op in ops)
    compute_ops = flatten_in_memory_order(compute_ops, lower[:2].to(dtype))
    gradient_buffer = chunk_buffer(dtype) if first_is_linear else None
    noise_buffer = (torch.empty((chunk_rows, *box_shape), dtype=dtype, device=device, memory_format=memory_format)
                    if stride > 1 and settings.random_start != "center" else None)
    result = torch.empty((batch * target_count, *sample_shape), dtype=lower.dtype, device=device,
                         memory_format=memory_format)
    result_margin = torch.full((batch * target_count,), float("-inf"), dtype=lower.dtype, device=device)
    sizes = step_sizes(settings)
    with torch.no_grad():
        for restart, first in itertools.product(range(settings.restarts), range(0, batch, samples_per_chunk)):
            last = min(batch, first + samples_per_chunk)
            rows = slice(first * target_count, last * target_count)
            count = rows.stop - rows.start
            start, best = current_buffer[:count], best_buffer[:count]
            chunk_lower, chunk_upper = lower[first:last].unsqueeze(1), upper[first:last].unsqueeze(1)
            compute_lower, compute_upper = chunk_lower.to(dtype), chunk_upper.to(dtype)
            if noise_buffer is not None:  # drawn in the box's layout: the starts of the unrearranged attack
                start.copy_(F.pixel_unshuffle(noise_buffer[:count].uniform_(generator=generator), stride))
            elif settings.random_start != "center":
                start.uniform_(generator=generator)
            place_start(start.view(last - first, target_count, *sample_shape), compute_lower, compute_upper, None,
                        settings.random_start)
            best_margin = _attack_chunk(
                compute_ops, start, spare_buffer[:count], best, compute_lower, compute_upper,
                labels[first:last].repeat_interleave(target_count).view(-1, 1), targets[first:last].reshape(-1, 1),
                sizes, None if gradient_buffer is None else gradient_buffer[:count])
            better = (best_margin > result_margin[rows]) | (restart == 0)
            result_margin[rows] = torch.where(better, best_margin, result_margin[rows])
            if dtype != lower.dtype:  # back in the box's precision, and in its box (rounding may leave it)
                best = best.to(lower.dtype).view(last - first, target_count, *sample_shape)
                best = best.clamp_(chunk_lower, chunk_upper).view(count, *sample_shape)
            torch.where(_rows(better, best.dim()), best, result[rows], out=result[rows])
    if stride > 1:
        result = F.pixel_shuffle(result, stride).contiguous(memory_format=memory_format)
    return result.view(batch, target_count, *box_shape)
