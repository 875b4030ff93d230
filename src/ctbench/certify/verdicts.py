"""Per-sample verdicts of the certification cascade, as immutable records.

A ``Verdict`` says what the cascade decided for one test sample:

* ``certified``: a stage proved every margin z_y - z_i (i != y) positive on the whole input box,
  and the proof was re-done in float64 with a safety margin (``soundness``);
* ``falsified``: a counterexample was found: a float32 point inside the box (clamped to the
  data range) that the plain float32 forward pass of the model (``model.eval()``) misclassifies;
* ``wrong``: the clean input is already misclassified (nothing to certify or attack);
* ``unknown``: no stage decided (time-out, domain limit, or a numerically undecidable case).

Invariants enforced here, in code:

* a record is certified or falsified, never both: a certified record carries no
  counterexample and a margin lower bound > 0; a falsified one carries a counterexample;
* a falsified record can only be made by ``falsified_verdict``, which checks the counterexample
  with ``check_counterexample`` (inside the box in exact float64 arithmetic, misclassified by
  the float32 model) and raises ``InvalidCounterexample`` otherwise (a record read back from a
  file is trusted as written; ``check_counterexample`` can re-check it);
* ``VerdictBook`` (the per-run table the cascade fills) refuses a second, different verdict for
  an index, so no sample is ever both certified and falsified.

Records are written one JSON object a line (``to_json``/``from_json``); the keys ``index`` and
``verdict`` are a stable contract for other modules (analysis reads them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .provenance import Provenance

VERDICTS = ("certified", "falsified", "wrong", "unknown")


class InvalidVerdict(ValueError):
    """A record that breaks an invariant (e.g. certified with a counterexample)."""


class InvalidCounterexample(InvalidVerdict):
    """A claimed counterexample is outside the box or not misclassified by the float32 model."""


@dataclass(frozen=True)
class Verdict:
    """One sample's verdict.

    index: the sample's index in the split; verdict: one of ``VERDICTS``; stage: the stage
    that decided ("ibp", "crown-ibp", "alpha-crown", "bab", "milp", "attack", "clean" for
    wrong samples; for unknown, the last stage tried); seconds: wall time spent on the sample
    (batched stages share their time equally among the samples they ran on); margin_lower: the
    best lower bound of min_{i != y} (z_y - z_i) over the box that any stage computed
    (the rigorous bound for certified samples; None when no bound was computed); label and
    predicted (the class of the clean input, or of the counterexample when falsified);
    counterexample: the point as a nested list (float32 values) or counterexample_path: a
    file (``.npy``) holding it; margin_upper: z_y - max_{i != y} z_i at the counterexample
    (negative or zero) or at the clean input for wrong samples; eps; times: seconds per stage;
    detail: a short free-form note (e.g. "timeout", "domains=123"); provenance: what the verdict
    is of (model hash, eps, data, settings hash, version; ``provenance.Provenance``)."""

    index: int
    verdict: str
    stage: str
    seconds: float = 0.0
    margin_lower: float | None = None
    label: int | None = None
    predicted: int | None = None
    eps: float | None = None
    counterexample: list | None = None
    counterexample_path: str | None = None
    margin_upper: float | None = None
    times: Mapping[str, float] = field(default_factory=dict)
    detail: str | None = None
    provenance: Provenance | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise InvalidVerdict(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if int(self.index) != self.index or self.index < 0:
            raise InvalidVerdict(f"index must be a non-negative integer, got {self.index!r}")
        has_counterexample = self.counterexample is not None or self.counterexample_path is not None
        if self.verdict == "certified":
            if has_counterexample:
                raise InvalidVerdict(f"sample {self.index}: a certified verdict cannot carry a counterexample")
            if self.margin_lower is None or not self.margin_lower > 0:
                raise InvalidVerdict(f"sample {self.index}: certified needs a positive margin lower bound, "
                                     f"got {self.margin_lower}")
        elif self.verdict == "falsified":
            if not has_counterexample:
                raise InvalidVerdict(f"sample {self.index}: a falsified verdict needs a counterexample")
            if self.margin_lower is not None and self.margin_lower > 0:
                raise InvalidVerdict(f"sample {self.index}: falsified but a positive margin lower bound "
                                     f"{self.margin_lower} was computed: the bound or the attack is wrong")
        elif has_counterexample:
            raise InvalidVerdict(f"sample {self.index}: only falsified verdicts carry a counterexample")

    @property
    def certified(self) -> bool:
        return self.verdict == "certified"

    @property
    def falsified(self) -> bool:
        return self.verdict == "falsified"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; None fields are left out, non-finite floats become None."""
        out: dict[str, Any] = {}
        for key in ("index", "verdict", "stage", "seconds", "margin_lower", "label", "predicted", "eps",
                    "counterexample", "counterexample_path", "margin_upper", "detail"):
            value = getattr(self, key)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if value is not None:
                out[key] = value
        if self.times:
            out["times"] = {name: float(seconds) for name, seconds in self.times.items()}
        if self.provenance is not None:
            out["provenance"] = self.provenance.to_json()
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Verdict":
        known = {"index", "verdict", "stage", "seconds", "margin_lower", "label", "predicted", "eps",
                 "counterexample", "counterexample_path", "margin_upper", "times", "detail", "provenance"}
        values = {key: value for key, value in data.items() if key in known}
        values.setdefault("stage", "unknown")
        values["times"] = dict(values.get("times") or {})
        if values.get("provenance") is not None:
            values["provenance"] = Provenance.from_json(values["provenance"])
        return Verdict(**values)

    def same_decision(self, other: "Verdict") -> bool:
        """Whether two records of one sample agree (used when merging shards)."""
        return self.index == other.index and self.verdict == other.verdict


# ----------------------------------------------------------------------------------------------
# Counterexamples


def box_bounds_float64(x: Tensor, eps: float, data_range: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """The exact box [max(x - eps, lo), min(x + eps, hi)] in float64 (x cast exactly)."""
    x64 = x.detach().to(torch.float64)
    lo, hi = data_range
    return (x64 - eps).clamp(min=lo), (x64 + eps).clamp(max=hi)


def project_float32(point: Tensor, x: Tensor, eps: float, data_range: tuple[float, float]) -> Tensor:
    """The float32 point nearest to ``point`` that lies in the exact (float64) box: clamp in
    float64, round to float32, and step one ulp inwards where rounding went outside."""
    lower, upper = box_bounds_float64(x, eps, data_range)
    inside = torch.minimum(torch.maximum(point.detach().to(torch.float64), lower), upper)
    rounded = inside.to(torch.float32)
    below, above = rounded.double() < lower, rounded.double() > upper
    rounded = torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)
    rounded = torch.where(above, torch.nextafter(rounded, torch.full_like(rounded, -math.inf)), rounded)
    outside = (rounded.double() < lower) | (rounded.double() > upper)
    # A box narrower than one float32 ulp: x itself (a float32 inside the box) is the answer.
    return torch.where(outside, x.detach().to(torch.float32), rounded)


@dataclass(frozen=True)
class CounterexampleCheck:
    inside: bool
    misclassified: bool
    predicted: int
    margin: float  # z_y - max_{i != y} z_i at the point, float32 forward pass

    @property
    def valid(self) -> bool:
        return self.inside and self.misclassified


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_counterexample(model: nn.Module, x: Tensor, label: int, eps: float, point: Tensor,
                         data_range: tuple[float, float] = (0.0, 1.0)) -> CounterexampleCheck:
    """Check one candidate (shape of one sample, no batch dim): inside the box in exact float64
    arithmetic, and misclassified (argmax != label) by a plain float32 forward pass of the model
    in eval mode."""
    point32 = point.detach().to(torch.float32)
    if not torch.equal(point32.double(), point.detach().double()):
        return CounterexampleCheck(False, False, -1, math.nan)  # not a float32 point
    lower, upper = box_bounds_float64(x.to(point32.device), eps, data_range)
    inside = bool(((point32.double() >= lower) & (point32.double() <= upper)).all())
    if model.training:
        raise InvalidCounterexample("counterexamples are checked with the model in eval mode")
    with torch.no_grad():
        logits = model(point32.unsqueeze(0).to(model_device(model))).float()[0]
    predicted = int(logits.argmax())
    others = logits.clone()
    others[label] = -math.inf
    margin = float(logits[label] - others.max())
    return CounterexampleCheck(inside, predicted != label, predicted, margin)


def falsified_verdict(model: nn.Module, index: int, x: Tensor, label: int, eps: float, point: Tensor,
                      stage: str, data_range: tuple[float, float] = (0.0, 1.0), *,
                      counterexample_path: str | None = None, **fields) -> Verdict:
    """A falsified verdict, made only after ``check_counterexample`` confirms the point.
    The point is stored inline unless ``counterexample_path`` (where the caller saved it) is given."""
    check = check_counterexample(model, x, label, eps, point, data_range)
    if not check.valid:
        raise InvalidCounterexample(
            f"sample {index}: the {stage} counterexample is {'inside' if check.inside else 'outside'} the box "
            f"and {'misclassified' if check.misclassified else 'correctly classified'} (margin {check.margin:g})")
    inline = None if counterexample_path else point.detach().to(torch.float32).cpu().tolist()
    return Verdict(index=index, verdict="falsified", stage=stage, label=int(label), predicted=check.predicted,
                   eps=eps, counterexample=inline, counterexample_path=counterexample_path,
                   margin_upper=check.margin, **fields)


def counterexample_tensor(verdict: Verdict, root=None) -> Tensor | None:
    """The counterexample of a falsified record as a float32 tensor (inline, or read from its
    ``.npy`` file, relative to ``root`` when the path is relative)."""
    if verdict.counterexample is not None:
        return torch.tensor(verdict.counterexample, dtype=torch.float32)
    if verdict.counterexample_path is not None:
        import numpy as np
        from pathlib import Path

        path = Path(verdict.counterexample_path)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        return torch.from_numpy(np.load(path)).to(torch.float32)
    return None


# ----------------------------------------------------------------------------------------------
# A table of verdicts that refuses contradictions


class VerdictConflict(InvalidVerdict):
    """One sample got two different verdicts (e.g. from two shards)."""


class VerdictBook:
    """Verdicts by index; adding a second record for an index is allowed only when it agrees
    (same verdict), and then the first one is kept."""

    def __init__(self, verdicts: Sequence[Verdict] = ()) -> None:
        self._by_index: dict[int, Verdict] = {}
        for verdict in verdicts:
            self.add(verdict)

    def add(self, verdict: Verdict, source: str = "") -> bool:
        """Add a record; returns False when an agreeing record was already there."""
        known = self._by_index.get(verdict.index)
        if known is None:
            self._by_index[verdict.index] = verdict
            return True
        if not known.same_decision(verdict):
            where = f" ({source})" if source else ""
            raise VerdictConflict(f"sample {verdict.index} is {known.verdict} (stage {known.stage}) and "
                                  f"{verdict.verdict} (stage {verdict.stage}){where}")
        return False

    def __contains__(self, index: int) -> bool:
        return index in self._by_index

    def __len__(self) -> int:
        return len(self._by_index)

    def get(self, index: int) -> Verdict | None:
        return self._by_index.get(index)

    def sorted(self) -> list[Verdict]:
        return [self._by_index[index] for index in sorted(self._by_index)]


def with_time(verdict: Verdict, seconds: float, times: Mapping[str, float]) -> Verdict:
    return replace(verdict, seconds=float(seconds), times=dict(times))
