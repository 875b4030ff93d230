"""Projected gradient descent in an L_inf box (Madry et al. 2018), with batched restarts.

The attack only needs a function from inputs to logits; callers pass one built from a network
lowered with detached parameters, so no parameter gradient is ever computed during an attack.
Restarts run as one batch of size restarts x B. Every iterate (the start included) is scored
and the highest-loss point per sample is kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bounds.box import Box, box_memory_format

LogitsFn = Callable[[Tensor], Tensor]
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
CHOICES = {"step_relative_to": ("half_width", "width"), "step_schedule": ("constant", "decay"),
           "random_start": ("clamped_noise", "uniform", "center")}
# (logits, labels) -> per-sample loss to maximize; labels may carry extra columns (e.g. targets)
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PGDSettings:
    """steps: gradient steps per restart; restarts: independent random starts; step_size:
    sign-step length per coordinate as a fraction of the box's ``step_relative_to`` ("width"
    or "half_width", per coordinate); step_schedule: "decay" multiplies it by step_decay at
    each fraction of the run listed in decay_at, "constant" keeps it; random_start: "uniform"
    in the box, "clamped_noise" (the origin plus uniform noise of the box's half-width, clamped
    to the box: the reference's start, where pixels at 0 or 1 start on a face) or "center";
    precision: "float32", or "bfloat16"/"float16" to run the network under autocast (the
    attack only proposes points, so reduced precision cannot make a bound unsound), or "auto":
    bfloat16 where the device has fast bf16 matmuls (``fast_bfloat16``), else float32.

    The defaults are ctbench's evaluation attack; training attacks take theirs from the
    config's ``attack`` section, whose defaults are the reference's (REFERENCE.md)."""

    steps: int = 10
    restarts: int = 3
    step_size: float = 0.25
    step_relative_to: str = "width"
    step_schedule: str = "decay"
    step_decay: float = 0.5
    decay_at: tuple[float, ...] = (0.5, 0.75)
    random_start: str = "uniform"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"attack precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.steps < 0 or self.restarts < 1:
            raise ValueError(f"PGD needs steps >= 0 and restarts >= 1, got {self.steps}, {self.restarts}")
        if self.step_size <= 0:
            raise ValueError(f"PGD step_size must be positive, got {self.step_size}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"attack {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """max_{i != y} z_i - z_y: positive exactly when the input is misclassified."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.max(dim=1).values - true


def step_sizes(settings: PGDSettings) -> list[float]:
    """Each step's length as a fraction of the box width."""
    base = settings.step_size / 2 if settings.step_relative_to == "half_width" else settings.step_size
    sizes = []
    for step in range(settings.steps):
        decays = sum(1 for at in settings.decay_at if step >= at * settings.steps)
        sizes.append(base * settings.step_decay ** decays if settings.step_schedule == "decay" else base)
    return sizes


def place_start(points: Tensor, lower: Tensor, upper: Tensor, origin: Tensor | None, kind: str) -> None:
    """Turn ``points``, uniform noise in [0, 1) (anything for "center"), into the start points
    of ``kind`` in the box, in place; the box broadcasts against ``points``."""
    if kind == "center":
        points.copy_(((lower + upper) / 2).expand_as(points))
        return
    if kind == "uniform":
        points.mul_(upper - lower).add_(lower)
        return
    center = (lower + upper) / 2 if origin is None else origin.detach()
    points.sub_(0.5).mul_(upper - lower).add_(center)  # noise of the half-width around the origin
    points.clamp_(lower, upper)


def pgd_attack(logits_fn: LogitsFn, box: Box, labels: Tensor, settings: PGDSettings,
               loss_fn: LossFn = cross_entropy_loss, generator: torch.Generator | None = None,
               origin: Tensor | None = None, score_fn: LossFn | None = None) -> Tensor:
    """The highest-loss point found in ``box`` for each sample (shape of box.lower), detached.
    ``origin`` (the clean input) is where a "clamped_noise" start is centred; default the box centre.
    ``score_fn`` (default ``loss_fn``) ranks the iterates: the step follows the gradient of
    ``loss_fn``, the point kept is the one with the highest score (e.g. the margin, so that a
    misclassified point is never dropped for a correctly classified one of higher cross-entropy).

    The restarts are one batch of restarts x B points; the box is not copied per restart but
    broadcast over a (restarts, B, ...) view of the points, and each step updates the points in
    place (sign step, projection, keeping the best rows), which matters when the box is large
    (TAPS attacks the latent box of every margin)."""
    restarts, batch = settings.restarts, labels.shape[0]
    lower, upper = box.lower.detach(), box.upper.detach()
    width = upper - lower
    buffer = torch.empty((restarts * batch, *lower.shape[1:]), dtype=lower.dtype, device=lower.device,
                        memory_format=box_memory_format(lower))
    points = buffer.view(restarts, *lower.shape)  # the same storage, one row of boxes per restart
    if settings.random_start != "center":
        buffer.uniform_(generator=generator)
    place_start(points, lower, upper, origin, settings.random_start)
    targets = labels.repeat(restarts, *([1] * (labels.dim() - 1)))
    best_point = buffer.clone()
    dtype = PRECISIONS[resolve_precision(settings.precision, buffer.device)]
    autocast = torch.autocast(buffer.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    best_loss = torch.full((targets.shape[0],), float("-inf"), dtype=lower.dtype, device=lower.device)
    for step_size in step_sizes(settings) + [None]:
        last = step_size is None  # only scored
        point = buffer.detach().requires_grad_(not last)  # the graph of each step is freed before the update
        with torch.set_grad_enabled(not last), autocast:
            logits = logits_fn(point).float()
            loss = loss_fn(logits, targets)
            gradient = None if last else torch.autograd.grad(loss.sum(), point)[0]
        loss = (loss if score_fn is None else score_fn(logits, targets)).detach().to(best_loss.dtype)
        improved = loss > best_loss
        best_loss = torch.where(improved, loss, best_loss)
        torch.where(improved.view(-1, *([1] * (buffer.dim() - 1))), buffer, best_point, out=best_point)
        if last:
            break
        points.addcmul_(width, gradient.sign_().view_as(points), value=step_size)
        points.clamp_(lower, upper)
    winner = best_loss.view(restarts, batch).argmax(dim=0)
    best_point = best_point.view(restarts, batch, *best_point.shape[1:])
    return best_point[winner, torch.arange(batch, device=labels.device)]


def evaluation_pgd(logits_fn: LogitsFn, box: Box, labels: Tensor, settings: PGDSettings,
                   generator: torch.Generator | None = None) -> Tensor:
    """ctbench's evaluation attack: PGD whose restarts alternate between the cross-entropy loss
    (restarts 1, 3, ...) and the margin loss (restarts 2, 4, ...), every iterate ranked by the
    margin. Returns the most-misclassified point found per sample (positive margin loss: a
    counterexample).

    Why both: the margin loss follows the gradient of the true logit and of the current
    runner-up only, and stalls when the class reachable within the box is another one (on
    standard-trained networks it finds fewer counterexamples than a textbook cross-entropy PGD
    of the same budget); the cross-entropy gradient weighs every class by its probability,
    while the margin is the stronger loss once a runner-up is close (adversarially trained
    networks). ``tests/test_evaluation_attack.py`` compares it with a textbook PGD."""
    cross_entropy_restarts = (settings.restarts + 1) // 2
    runs = [(cross_entropy_restarts, cross_entropy_loss), (settings.restarts - cross_entropy_restarts, margin_loss)]
    best_point, best_score = None, None
    for restarts, loss_fn in runs:
        if restarts == 0:
            continue
        point = pgd_attack(logits_fn, box, labels, dataclasses.replace(settings, restarts=restarts), loss_fn=loss_fn,
                           generator=generator, score_fn=margin_loss)
        with torch.no_grad():
            score = margin_loss(logits_fn(point).float(), labels)
        if best_point is None:
            best_point, best_score = point, score
            continue
        better = score > best_score
        best_point = torch.where(better.view(-1, *([1] * (point.dim() - 1))), point, best_point)
        best_score = torch.where(better, score, best_score)
    return best_point


def describe_pgd(settings: PGDSettings) -> str:
    """The evaluation attack in a table: e.g. "PGD 20x3 (CE+margin)"."""
    return f"PGD {settings.steps}x{settings.restarts} (CE+margin)"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bfloat16 matmuls are fast on ``device``: a CUDA GPU with bf16 support, or a CPU
    with AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The attack precision to use on ``device``: "auto" becomes bfloat16 or float32."""
    if precision != "auto":
        return precision
    return "bfloat16" if fast_bfloat16(device) else "float32"
