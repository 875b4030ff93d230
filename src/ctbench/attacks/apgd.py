"""Auto-PGD (Croce & Hein 2020) in an L_inf box: APGD-CE, APGD-T, and an AutoAttack-like
composition of the two.

APGD is PGD with a step size that adapts itself (Algorithm 1 of the paper), standard settings:

* ``iterations`` = 100; the step starts at 2 eps and is halved at the checkpoints
  w_j = p_j N, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), when
  (1) fewer than rho = 0.75 of the steps since the last checkpoint increased the loss, or
  (2) neither the step size nor the best loss changed since the last checkpoint; a halving also
  restarts from the best point found so far;
* momentum 0.75: x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1})) with
  z_{k+1} = P(x_k + eta sign(grad)).

Losses: cross-entropy (APGD-CE); the targeted difference-of-logits ratio
-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (APGD-T, run once per target class, the top 9
classes of the clean logits by default); and the untargeted DLR.

``autoattack_like`` runs APGD-CE and then APGD-T on the samples that survived it. It is *not*
the full AutoAttack: FAB-T and Square are not included (they rarely change the robust accuracy
of the standard version; the cascade adds PGD with the margin loss and a complete verifier).

Every random start is drawn from a generator seeded per sample (``seeds``, e.g. dataset
indices), so the result for a sample does not depend on which samples share its batch.
Points are kept inside the box (clamped to the data range); the point returned per sample is the
misclassified point with the lowest margin when one was found, else the highest-loss point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bounds.box import Box, linf_box

LogitsFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class APGDSettings:
    iterations: int = 100
    restarts: int = 1
    momentum: float = 0.75
    rho: float = 0.75
    initial_step: float = 2.0  # times eps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError(f"APGD needs iterations >= 1 and restarts >= 1, got {self.iterations}, {self.restarts}")


def apgd_checkpoints(iterations: int) -> list[int]:
    """The iterations at which APGD may halve its step: w_j = ceil(p_j N) with the p_j of the
    paper, in integer steps (first gap 0.22 N, each next gap 0.03 N shorter, at least 0.06 N):
    22, 41, 57, 70, 80, 87, 93, 99 for N = 100."""
    gap = max(int(0.22 * iterations), 1)
    shrink, shortest = max(int(0.03 * iterations), 1), max(int(0.06 * iterations), 1)
    checkpoints, position = [], gap
    while position < iterations:
        checkpoints.append(position)
        gap = max(gap - shrink, shortest)
        position += gap
    return checkpoints


def _sorted_logits(logits: Tensor) -> Tensor:
    return logits.sort(dim=1, descending=True).values


def _rank(sorted_logits: Tensor, position: int) -> Tensor:
    return sorted_logits[:, min(position, sorted_logits.shape[1] - 1)]


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """z_y - max_{i != y} z_i (negative: misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.amax(dim=1)


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Untargeted DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)."""
    ordered = _sorted_logits(logits)
    return -margin(logits, labels) / (ordered[:, 0] - _rank(ordered, 2) + 1e-12)


def dlr_targeted_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    ordered = _sorted_logits(logits)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true - target) / (ordered[:, 0] - (_rank(ordered, 2) + _rank(ordered, 3)) / 2 + 1e-12)


def seeded_uniform(box: Box, seeds: Sequence[int], salt: int = 0) -> Tensor:
    """A point uniform in the box per sample, from a generator seeded by (seed, salt)."""
    noise = []
    for seed in seeds:
        generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2 ** 63))
        noise.append(torch.rand(box.lower.shape[1:], generator=generator, dtype=torch.float64))
    noise = torch.stack(noise).to(device=box.lower.device, dtype=box.lower.dtype)
    return box.lower + noise * (box.upper - box.lower)


def _apgd_run(logits_fn: LogitsFn, box: Box, labels: Tensor, loss_fn: Callable[[Tensor], Tensor], eps: Tensor,
              start: Tensor, settings: APGDSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One APGD run from ``start``. Returns (best-loss point, its loss, lowest-margin point,
    its margin)."""
    lower, upper = box.lower, box.upper
    view = (-1,) + (1,) * (start.dim() - 1)

    def project(point: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(point, lower), upper)

    def evaluate(point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = logits_fn(point)
            loss = loss_fn(logits)
            gradient = torch.autograd.grad(loss.sum(), point)[0]
        return loss.detach(), gradient.detach(), margin(logits.detach(), labels)

    step = (settings.initial_step * eps).to(start.dtype).view(view).clone()  # per sample
    current = project(start)
    loss, gradient, current_margin = evaluate(current)
    best_x, best_loss, best_gradient = current.clone(), loss.clone(), gradient.clone()
    fooled_x, fooled_margin = current.clone(), current_margin.clone()
    previous_x = current.clone()
    following = project(current + step * gradient.sign())
    checkpoints = set(apgd_checkpoints(settings.iterations))
    last_checkpoint = 0
    increases = torch.zeros_like(loss)
    step_at_checkpoint, best_at_checkpoint = step.clone(), best_loss.clone()
    previous_loss = loss
    for k in range(1, settings.iterations + 1):
        previous_x, current = current, following
        loss, gradient, current_margin = evaluate(current)
        lower_margin = current_margin < fooled_margin
        fooled_margin = torch.where(lower_margin, current_margin, fooled_margin)
        fooled_x = torch.where(lower_margin.view(view), current, fooled_x)
        increases += (loss > previous_loss).to(increases.dtype)
        previous_loss = loss
        improved = loss > best_loss
        best_loss = torch.where(improved, loss, best_loss)
        best_x = torch.where(improved.view(view), current, best_x)
        best_gradient = torch.where(improved.view(view), gradient, best_gradient)
        if k == settings.iterations:
            break
        if k in checkpoints:
            few_increases = increases < settings.rho * (k - last_checkpoint)
            stalled = (step_at_checkpoint.flatten() == step.flatten()) & (best_at_checkpoint == best_loss)
            reduce = few_increases | stalled
            step_at_checkpoint, best_at_checkpoint = step.clone(), best_loss.clone()
            step = torch.where(reduce.view(view), step / 2, step)
            current = torch.where(reduce.view(view), best_x, current)
            gradient = torch.where(reduce.view(view), best_gradient, gradient)
            previous_x = torch.where(reduce.view(view), current, previous_x)
            increases = torch.zeros_like(increases)
            last_checkpoint = k
        z = project(current + step * gradient.sign())
        following = project(current + settings.momentum * (z - current) + (1 - settings.momentum) * (current - previous_x))
    return best_x, best_loss, fooled_x, fooled_margin


def apgd(logits_fn: LogitsFn, x: Tensor, labels: Tensor, eps: float | Tensor, *, loss: str = "ce",
         targets: Tensor | None = None, settings: APGDSettings = APGDSettings(),
         data_range: tuple[float, float] = (0.0, 1.0), seeds: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """APGD with loss "ce", "dlr" or "dlr-targeted" (``targets``: one class per sample).
    Returns (points, fooled): the lowest-margin point found per sample when it is misclassified
    by ``logits_fn`` (fooled True), else the highest-loss point."""
    if loss == "ce":
        loss_fn = lambda logits: F.cross_entropy(logits, labels, reduction="none")  # noqa: E731
    elif loss == "dlr":
        loss_fn = lambda logits: dlr_loss(logits, labels)  # noqa: E731
    elif loss == "dlr-targeted":
        if targets is None:
            raise ValueError("the targeted DLR loss needs targets")
        loss_fn = lambda logits: dlr_targeted_loss(logits, labels, targets)  # noqa: E731
    else:
        raise ValueError(f"unknown APGD loss {loss!r}; known: ce, dlr, dlr-targeted")
    x = x.detach()
    box = linf_box(x, eps, *data_range)
    eps_tensor = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
    seeds = list(range(x.shape[0])) if seeds is None else list(seeds)
    result = x.clone()
    result_margin = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    view = (-1,) + (1,) * (x.dim() - 1)
    for restart in range(settings.restarts):
        start = seeded_uniform(box, [seed + settings.seed * 7919 for seed in seeds], salt=restart)
        best_x, run_loss, fooled_x, fooled_margin = _apgd_run(logits_fn, box, labels, loss_fn, eps_tensor, start,
                                                              settings)
        # Prefer misclassified points (lowest margin); otherwise the highest loss.
        fooled_now = fooled_margin < 0
        take_fooled = fooled_now & (fooled_margin < result_margin)
        take_loss = ~fooled_now & (result_margin >= 0) & (run_loss > best_loss)
        result = torch.where(take_fooled.view(view), fooled_x, torch.where(take_loss.view(view), best_x, result))
        result_margin = torch.where(take_fooled, fooled_margin, result_margin)
        best_loss = torch.where(take_loss, run_loss, best_loss)
    return result.detach(), result_margin < 0


def top_targets(logits: Tensor, labels: Tensor, count: int) -> Tensor:
    """(B, min(count, K - 1)): the classes other than the label with the largest clean logits."""
    masked = logits.scatter(1, labels[:, None], float("-inf"))
    return masked.topk(min(count, logits.shape[1] - 1), dim=1).indices


def autoattack_like(model_fn: LogitsFn, x: Tensor, labels: Tensor, eps: float, *,
                    data_range: tuple[float, float] = (0.0, 1.0), ce: APGDSettings | None = APGDSettings(),
                    targeted: APGDSettings | None = APGDSettings(), target_count: int = 9,
                    seeds: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """APGD-CE, then APGD-T (targeted DLR, ``target_count`` top classes, one run each) on the
    samples APGD-CE did not fool. Returns (points, robust): robust is True where no attack
    found a misclassified point (clean misclassification counts as fooled). FAB-T and Square
    are not included."""
    x = x.detach()
    seeds = list(range(x.shape[0])) if seeds is None else list(seeds)
    with torch.no_grad():
        clean_logits = model_fn(x)
    points = x.clone()
    fooled = clean_logits.argmax(1) != labels
    view = (-1,) + (1,) * (x.dim() - 1)
    if ce is not None:
        open_ = (~fooled).nonzero().flatten()
        if open_.numel():
            adv, hit = apgd(model_fn, x[open_], labels[open_], eps, loss="ce", settings=ce, data_range=data_range,
                            seeds=[seeds[i] for i in open_.tolist()])
            points[open_] = torch.where(hit.view(view), adv, points[open_])
            fooled[open_] = hit
    if targeted is not None:
        targets = top_targets(clean_logits, labels, target_count)
        for rank in range(targets.shape[1]):
            open_ = (~fooled).nonzero().flatten()
            if open_.numel() == 0:
                break
            adv, hit = apgd(model_fn, x[open_], labels[open_], eps, loss="dlr-targeted",
                            targets=targets[open_, rank], settings=targeted, data_range=data_range,
                            seeds=[seeds[i] + 104729 * (rank + 1) for i in open_.tolist()])
            points[open_] = torch.where(hit.view(view), adv, points[open_])
            fooled[open_] = hit
    return points, ~fooled
