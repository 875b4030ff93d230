"""Certification stages, registered by name; the cascade runs them in order on open samples.

A stage gets the samples that no earlier stage decided (``OpenSamples``) and returns an
``Outcome``: the samples it decides (certified or falsified, by position), a margin lower
bound per sample where it computed one, and optionally its own per-sample seconds. Stages
never write files or build records: the cascade turns decisions into ``Verdict`` records,
confirming every counterexample with the model's float32 forward pass.

* ``ibp``: IBP with last-layer elision; certified after a rigorous re-check (``soundness``,
  ``rigorous``).
* ``crown-ibp``: CROWN on the margins with IBP intermediate bounds; rigorous re-check.
* ``attack``: PGD with the margin loss and per-sample seeded restarts, then optionally
  APGD-CE and APGD-T (``autoattack_like``); falsifies.
* ``alpha-crown``: alpha-CROWN on the K-1 margins with CROWN intermediate bounds for the
  ReLU layers of at most ``crown_max_neurons`` neurons (the dense ones in CNN7; both conv
  layers of CNN3 on MNIST), IBP for the others; rigorous re-check with the optimized slopes.
* ``bab``: branch and bound with alpha/beta-CROWN bounds and exact LP leaves
  (``bab.BranchAndBound``), complete up to its time-out; one sample at a time.
* ``milp``: an exact MILP (HiGHS) of the whole network, for tiny networks only
  (``max_neurons``), as a falsifier: its minimizer is a counterexample once the float32 model
  confirms it; a positive optimum is the solver's word, not a checked certificate, so the sample
  stays open (put ``bab`` after it for a proof).

Networks: ``ibp``, ``crown-ibp``, ``attack`` and ``alpha-crown`` (and their rigorous checks)
run on any lowered network, a chain or a DAG (residual connections, concatenations, average and
max pooling). ``bab`` and ``milp`` take chains and DAGs too, but no max pooling; ``check_network``
refuses such networks before the cascade starts, with the stages to use instead.

Adding a stage: a class with ``name`` and ``run(ctx, samples) -> Outcome``, registered with
``@STAGES.register(name)``.
"""
from __future__ import annotations

import difflib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ..attacks.apgd import APGDSettings, autoattack_like
from ..attacks.pgd import PGDSettings, margin_loss, pgd_attack
from ..bounds.box import Box
from ..bounds.crown import alpha_crown, crown_ibp_margin_lower, intermediate_bounds
from ..bounds.ibp import ibp_margin_lower
from ..models.ops import Network, require_ops, run_ops
from ..registry import Registry
from .bab import BabSettings, BranchAndBound, auto_crown_layers, check_network
from .milp import MILP_OPS, network_milp, network_neurons
from .rigorous import crown_lower, ibp_lower, interval_network, layer_bounds, rigorous_box
from .soundness import SafetyMargin, clean_logits64, float64_box, margin_rows, min_other
from .verdicts import check_counterexample, project_float32

DEFAULT_STAGES = ("ibp", "crown-ibp", "attack", "alpha-crown", "bab")


class CertifyInputError(ValueError):
    """A bad argument of the cascade (eps, data, stages, settings); the message names the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CertifyInputError(message)


@dataclass(frozen=True)
class AttackSettings:
    """PGD (margin loss): steps, restarts, step size as a fraction of the box width; then
    APGD-CE / APGD-T when enabled (standard: 100 iterations; targeted over ``apgd_targets``
    classes, with ``apgd_t_iterations`` each)."""

    pgd_steps: int = 50
    pgd_restarts: int = 5
    pgd_step_size: float = 0.25
    apgd_ce: bool = False
    apgd_t: bool = False
    apgd_iterations: int = 100
    apgd_t_iterations: int = 100
    apgd_targets: int = 9
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.pgd_steps >= 0 and self.pgd_restarts >= 0,
                 f"attack steps and restarts must be >= 0, got {self.pgd_steps} steps x {self.pgd_restarts} restarts")
        _require(math.isfinite(self.pgd_step_size) and self.pgd_step_size > 0,
                 f"the attack step size must be finite and > 0, got {self.pgd_step_size}")
        _require(self.apgd_iterations >= 1 and self.apgd_t_iterations >= 1 and self.apgd_targets >= 1,
                 "APGD iterations and targets must be >= 1")


@dataclass(frozen=True)
class AlphaCrownSettings:
    iterations: int = 30
    lr: float = 0.1
    intermediate: str = "crown"
    crown_max_neurons: int = 4096
    batch_size: int = 16


@dataclass(frozen=True)
class MilpSettings:
    max_neurons: int = 256
    time_limit: float | None = None  # seconds per sample (None: the remaining per-sample budget)


@dataclass(frozen=True)
class CertifySettings:
    """Everything the cascade needs besides the model, the data and eps.

    timeout: per-sample seconds (paper: 1000), the budget of all stages together; the per-sample
    stages (bab, milp) get what the batched stages left. batch_size: samples per cascade batch.
    cross_check: also attack every certified sample and raise if one is falsified (a soundness
    self-test; off by default). inline_counterexample_limit: counterexamples with more elements
    go to ``counterexamples/<index>.npy`` in the output folder."""

    stages: tuple[str, ...] = DEFAULT_STAGES
    timeout: float = 1000.0
    batch_size: int = 128
    data_range: tuple[float, float] = (0.0, 1.0)
    safety: SafetyMargin = SafetyMargin()
    attack: AttackSettings = AttackSettings()
    alpha: AlphaCrownSettings = AlphaCrownSettings()
    bab: BabSettings = BabSettings()
    milp: MilpSettings = MilpSettings()
    cross_check: bool = False
    inline_counterexample_limit: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", stage_names(self.stages))
        _require(math.isfinite(self.timeout) and self.timeout > 0,
                 f"the per-sample timeout must be finite and > 0 seconds, got {self.timeout} (--timeout)")
        _require(self.batch_size >= 1, f"the batch size must be >= 1, got {self.batch_size} (--batch-size)")
        lo, hi = self.data_range
        _require(math.isfinite(lo) and math.isfinite(hi) and lo < hi,
                 f"the data range must be finite with lower < upper, got {self.data_range}")


@dataclass(eq=False)
class StageContext:
    model: nn.Module  # float32, eval mode: the authority for counterexamples
    ops32: Network
    ops64: Network
    eps: float
    num_classes: int
    settings: CertifySettings

    @property
    def data_range(self) -> tuple[float, float]:
        return self.settings.data_range

    @functools.cached_property
    def net(self) -> Network:
        """The real-valued network every certificate is about (``rigorous.interval_network``)."""
        return interval_network(self.model)

    def outward_box(self, x: Tensor) -> Box:
        """The box of every real point within eps of x (``rigorous.rigorous_box``)."""
        return rigorous_box(x, self.eps, self.data_range)


@dataclass(eq=False)
class OpenSamples:
    """indices: dataset indices; x (n, ...) float32; labels (n,); budgets: seconds left per
    sample (for the per-sample stages)."""

    indices: list[int]
    x: Tensor
    labels: Tensor
    budgets: list[float]

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Decision:
    position: int
    verdict: str  # "certified" or "falsified"
    margin_lower: float | None = None
    counterexample: Tensor | None = None
    detail: str | None = None


@dataclass(eq=False)
class Outcome:
    decisions: list[Decision] = field(default_factory=list)
    margins: Tensor | None = None  # (n,) best margin lower bound computed (-inf where none)
    seconds: list[float] | None = None  # per sample, when the stage measured it
    details: dict[int, str] = field(default_factory=dict)  # position -> note for undecided samples


class Stage:
    """``per_sample``: the cascade calls ``run`` with one sample at a time (expensive stages),
    so that each verdict is written as soon as it is known."""

    name = "stage"
    per_sample = False

    def check_network(self, network: Network) -> None:
        """Raise a TypeError naming what this stage cannot handle in ``network`` (a lowered
        model); every network is accepted by default."""

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:  # pragma: no cover - interface
        raise NotImplementedError


STAGES: Registry[type] = Registry("certification stage")


def build_stage(name: str) -> Stage:
    return STAGES.get(name)()


def _box32(ctx: StageContext, x: Tensor) -> Box:
    lo, hi = ctx.data_range
    return Box((x - ctx.eps).clamp(min=lo), (x + ctx.eps).clamp(max=hi))


def _thresholds(ctx: StageContext, x: Tensor) -> Tensor:
    return ctx.settings.safety.threshold(clean_logits64(ctx.ops64, x))


def _certify_rigorously(ctx: StageContext, samples: OpenSamples, margins32: Tensor, rigorous_rows) -> Outcome:
    """Candidates (float32 min margin > 0) are re-bounded by ``rigorous_rows(box, spec)`` ->
    (m, K-1) rigorous lower bounds of their margin rows; certified where the smallest exceeds
    the safety threshold."""
    lower32 = min_other(margins32, samples.labels).double()
    margins = lower32.clone()
    decisions = []
    candidates = (lower32 > 0).nonzero().flatten()
    if candidates.numel():
        spec = margin_rows(samples.labels[candidates], ctx.num_classes, torch.float64)
        lower = rigorous_rows(ctx.outward_box(samples.x[candidates]), spec).amin(dim=1)
        threshold = _thresholds(ctx, samples.x[candidates])
        for row, bound, limit in zip(candidates.tolist(), lower.tolist(), threshold.tolist()):
            margins[row] = bound
            if bound > limit:
                decisions.append(Decision(row, "certified", bound))
    return Outcome(decisions, margins.cpu())


@STAGES.register("ibp")
class IbpStage(Stage):
    name = "ibp"

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:
        with torch.no_grad():
            margins32, _ = ibp_margin_lower(ctx.ops32, _box32(ctx, samples.x), samples.labels)
        return _certify_rigorously(ctx, samples, margins32,
                                   lambda box, spec: ibp_lower(ctx.net, layer_bounds(ctx.net, box), spec))


@STAGES.register("crown-ibp")
class CrownIbpStage(Stage):
    name = "crown-ibp"

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:
        with torch.no_grad():
            margins32 = crown_ibp_margin_lower(ctx.ops32, _box32(ctx, samples.x), samples.labels, ctx.num_classes)
        return _certify_rigorously(ctx, samples, margins32,
                                   lambda box, spec: crown_lower(ctx.net, layer_bounds(ctx.net, box), spec))


@STAGES.register("alpha-crown")
class AlphaCrownStage(Stage):
    name = "alpha-crown"

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:
        settings = ctx.settings.alpha
        crown_layers = auto_crown_layers(ctx.ops32, tuple(samples.x.shape[1:]), settings.crown_max_neurons)
        outcome = Outcome(margins=torch.full((len(samples),), -math.inf, dtype=torch.float64))
        for start in range(0, len(samples), settings.batch_size):
            rows = torch.arange(start, min(start + settings.batch_size, len(samples)), device=samples.x.device)
            x, labels = samples.x[rows], samples.labels[rows]
            box = _box32(ctx, x)
            with torch.no_grad():
                intermediate = intermediate_bounds(ctx.ops32, box, settings.intermediate, crown_layers=crown_layers)
            spec = margin_rows(labels, ctx.num_classes, torch.float32)
            result = alpha_crown(ctx.ops32, box, spec, intermediate, settings.iterations, settings.lr)
            lower32 = result.lower.amin(dim=1).double()
            outcome.margins[rows.cpu()] = lower32.cpu()
            candidates = (lower32 > 0).nonzero().flatten()
            if candidates.numel() == 0:
                continue
            bounds = layer_bounds(ctx.net, ctx.outward_box(x[candidates]),
                                  crown_layers=crown_layers if settings.intermediate == "crown" else ())
            lower = crown_lower(ctx.net, bounds, margin_rows(labels[candidates], ctx.num_classes, torch.float64),
                                {index: alpha[candidates] for index, alpha in result.alphas.items()}).amin(dim=1)
            threshold = _thresholds(ctx, x[candidates])
            for local, bound, limit in zip(candidates.tolist(), lower.tolist(), threshold.tolist()):
                position = start + local
                outcome.margins[position] = bound
                if bound > limit:
                    outcome.decisions.append(Decision(position, "certified", bound))
        return outcome


def _confirmed(ctx: StageContext, x: Tensor, label: int, point: Tensor) -> Tensor | None:
    """The float32 projection of ``point`` when the model confirms it, else None."""
    point = project_float32(point.unsqueeze(0), x.unsqueeze(0), ctx.eps, ctx.data_range)[0]
    check = check_counterexample(ctx.model, x, label, ctx.eps, point, ctx.data_range)
    return point if check.valid else None


@STAGES.register("attack")
class AttackStage(Stage):
    name = "attack"

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:
        settings = ctx.settings.attack
        logits_fn = lambda z: run_ops(ctx.ops32, z)  # noqa: E731
        pgd = PGDSettings(steps=settings.pgd_steps, restarts=settings.pgd_restarts, step_size=settings.pgd_step_size)
        outcome = Outcome()
        found: dict[int, Tensor] = {}
        if settings.pgd_restarts > 0 and settings.pgd_steps >= 0:
            for position, index in enumerate(samples.indices):
                x, label = samples.x[position:position + 1], samples.labels[position:position + 1]
                generator = torch.Generator(device=x.device).manual_seed(settings.seed * 1_000_003 + index)
                point = pgd_attack(logits_fn, _box32(ctx, x), label, pgd, loss_fn=margin_loss, generator=generator)
                confirmed = _confirmed(ctx, x[0], int(label), point[0])
                if confirmed is not None:
                    found[position] = confirmed
        if settings.apgd_ce or settings.apgd_t:
            open_rows = [p for p in range(len(samples)) if p not in found]
            if open_rows:
                rows = torch.tensor(open_rows, device=samples.x.device)
                ce = APGDSettings(iterations=settings.apgd_iterations, seed=settings.seed) if settings.apgd_ce else None
                targeted = (APGDSettings(iterations=settings.apgd_t_iterations, seed=settings.seed)
                            if settings.apgd_t else None)
                points, robust = autoattack_like(logits_fn, samples.x[rows], samples.labels[rows], ctx.eps,
                                                 data_range=ctx.data_range, ce=ce, targeted=targeted,
                                                 target_count=settings.apgd_targets,
                                                 seeds=[samples.indices[p] for p in open_rows])
                for local, position in enumerate(open_rows):
                    if not robust[local]:
                        confirmed = _confirmed(ctx, samples.x[position], int(samples.labels[position]), points[local])
                        if confirmed is not None:
                            found[position] = confirmed
        for position, point in sorted(found.items()):
            outcome.decisions.append(Decision(position, "falsified", counterexample=point))
        return outcome


def _bab_confirm(ctx: StageContext):
    def confirm(points: Tensor, x: Tensor, label: int) -> Tensor:
        return torch.tensor([check_counterexample(ctx.model, x, label, ctx.eps, point, ctx.data_range).valid
                             for point in points], dtype=torch.bool)

    return confirm


@STAGES.register("bab")
class BabStage(Stage):
    name = "bab"
    per_sample = True

    def check_network(self, network: Network) -> None:
        check_network(network)

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:
        verifier = BranchAndBound(ctx.ops32, ctx.ops64, ctx.settings.bab, ctx.settings.safety, _bab_confirm(ctx),
                                  net=ctx.net)
        outcome = Outcome(margins=torch.full((len(samples),), -math.inf, dtype=torch.float64), seconds=[])
        for position in range(len(samples)):
            start = time.monotonic()
            result = verifier.verify(samples.x[position], int(samples.labels[position]), ctx.eps, ctx.num_classes,
                                     ctx.data_range, deadline=start + max(samples.budgets[position], 0.0))
            outcome.seconds.append(time.monotonic() - start)
            if result.status == "certified":
                outcome.margins[position] = result.margin_lower
                outcome.decisions.append(Decision(position, "certified", result.margin_lower, detail=result.detail))
            elif result.status == "falsified":
                outcome.decisions.append(Decision(position, "falsified", counterexample=result.counterexample,
                                                  detail=result.detail))
            else:
                outcome.margins[position] = result.margin_lower
                outcome.details[position] = result.detail
        return outcome


@STAGES.register("milp")
class MilpStage(Stage):
    name = "milp"
    per_sample = True

    def check_network(self, network: Network) -> None:
        require_ops(network, MILP_OPS, "the MILP encoding")

    def run(self, ctx: StageContext, samples: OpenSamples) -> Outcome:
        settings = ctx.settings.milp
        outcome = Outcome(margins=torch.full((len(samples),), -math.inf, dtype=torch.float64), seconds=[])
        if network_neurons(ctx.ops64, tuple(samples.x.shape[1:])) > settings.max_neurons:
            outcome.seconds = [0.0] * len(samples)
            outcome.details = {p: "network too large for the milp stage" for p in range(len(samples))}
            return outcome
        for position in range(len(samples)):
            start = time.monotonic()
            x, label = samples.x[position], int(samples.labels[position])
            box64 = float64_box(x.unsqueeze(0), ctx.eps, ctx.data_range)
            limit = settings.time_limit if settings.time_limit is not None else max(samples.budgets[position], 1.0)
            result = network_milp(ctx.ops64, box64, label, ctx.num_classes, stop_below=0.0, time_limit=limit)
            if result.minimum < 0 and result.point is not None:
                confirmed = _confirmed(ctx, x, label, result.point.to(x.device))
                if confirmed is not None:
                    outcome.decisions.append(Decision(position, "falsified", counterexample=confirmed))
                else:
                    outcome.details[position] = "milp minimizer not confirmed by the float32 model"
            elif result.exact:
                outcome.details[position] = (f"milp optimum {result.minimum:.4g} (the solver's word, not a checked "
                                             f"certificate: add the bab stage for a proof)")
            else:
                outcome.details[position] = "milp time limit"
            outcome.seconds.append(time.monotonic() - start)
        return outcome


def stage_names(stages: str | Sequence[str]) -> tuple[str, ...]:
    """Parse "ibp,crown-ibp,..." (or a sequence) and check every name is registered, none twice."""
    names = tuple(s.strip() for s in stages.split(",") if s.strip()) if isinstance(stages, str) else tuple(stages)
    known = ", ".join(STAGES.names())
    _require(len(names) > 0, f"no certification stage given (--stages); known: {known}")
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, STAGES.names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CertifyInputError(f"unknown certification stage {name!r} (--stages); known: {known}{hint}")
    _require(len(set(names)) == len(names), f"a stage is listed twice in {','.join(names)} (--stages)")
    return names
