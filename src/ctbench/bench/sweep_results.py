"""A sweep's results: its trials, the natural-vs-certified Pareto front, the chosen config and
the user preset that keeps it.

All figures are validation accuracies (fractions; printed in percent). The chosen trial is the
best certified one, ties broken by natural accuracy, then by the preset's own values (an exact tie
is no evidence to change them), then by the earlier trial. A grid point
that was run twice (a retry, or two workers) counts once: its first complete trial.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import apply_overrides, merge
from ..io import atomic_write_text
from .sweep import SweepError, nested, point_label, preset_params


@dataclass(frozen=True)
class TrialRow:
    """One Optuna trial: ``state`` as Optuna names it (COMPLETE, FAIL, RUNNING, WAITING, ...)."""

    number: int
    state: str
    params: dict[str, Any]
    certified: float | None = None
    natural: float | None = None
    error: str | None = None
    runs: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return point_label(self.params)


def trial_rows(study) -> list[TrialRow]:
    """The study's trials in order (values only for complete ones)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values if trial.state.name == "COMPLETE" else None
        rows.append(TrialRow(trial.number, trial.state.name, dict(trial.params),
                             values[0] if values else None, values[1] if values else None,
                             trial.user_attrs.get("error"), trial.user_attrs.get("validation", [])))
    return rows


def complete_points(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The first complete trial of each grid point."""
    seen, chosen = set(), []
    for row in rows:
        key = tuple(sorted(row.params.items()))
        if row.state == "COMPLETE" and key not in seen:
            seen.add(key)
            chosen.append(row)
    return chosen


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates (at least as high in both
    coordinates and higher in one), in order of the first coordinate; equal points all stay."""
    def dominated(i: int) -> bool:
        a = points[i]
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], -points[i][1]))


def front_of(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The complete points on the natural-vs-certified front, by natural accuracy."""
    points = complete_points(rows)
    return [points[i] for i in pareto_front([(row.natural, row.certified) for row in points])]


def choose(rows: Sequence[TrialRow], definition: dict[str, Any] | None = None) -> TrialRow | None:
    """Best certified, ties by natural, then the point of the preset's own values (when
    ``definition`` names the sweep), then the earlier trial; None without a complete trial."""
    points = complete_points(rows)
    own = preset_params(definition) if definition else None
    return max(points, key=lambda row: (row.certified, row.natural, row.params == own, -row.number)) if points else None


# ----------------------------------------------------------------------------------------------
# text


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def show_text(study: str, rows: Sequence[TrialRow], definition: dict[str, Any] | None = None) -> str:
    """The trials (front marked *, chosen marked >) and the front, as text."""
    front = {row.number for row in front_of(rows)}
    chosen = choose(rows, definition)
    lines = [f"sweep {study}: {len(rows)} trials (validation accuracy in %; * on the natural-vs-certified "
             f"front, > chosen)", f"{'':2s}{'trial':>5s} {'state':9s} {'cert.':>6s} {'nat.':>6s}  config"]
    for row in rows:
        mark = (">" if chosen is not None and row.number == chosen.number else " ") + (
            "*" if row.number in front else " ")
        detail = f"  ({row.error})" if row.error else ""
        lines.append(f"{mark}{row.number:5d} {row.state.lower():9s} {_percent(row.certified):>6s} "
                     f"{_percent(row.natural):>6s}  {row.label}{detail}")
    lines.append("front (natural -> certified): " + "; ".join(
        f"{_percent(row.natural)} / {_percent(row.certified)} ({row.label})" for row in front_of(rows)))
    if chosen is not None:
        lines.append(f"chosen: trial {chosen.number} {chosen.label}: certified {_percent(chosen.certified)}, "
                     f"natural {_percent(chosen.natural)}")
    return "\n".join(lines) + "\n"


def preset_text(definition: dict[str, Any], chosen: TrialRow, study: str) -> str:
    """A user preset: ``preset: SETTING/METHOD``, then the sweep's fixed overrides with the
    chosen grid values, as YAML sections."""
    data = apply_overrides({}, list(definition["overrides"]))
    for key, value in chosen.params.items():
        data = merge(data, nested(key, value))
    seeds = ",".join(map(str, definition["seeds"]))
    header = (f"preset: {definition['preset']}\n"
              f"# chosen by `ctbench sweep` (study {study}, trial {chosen.number}, seeds {seeds}): validation "
              f"certified {_percent(chosen.certified)}%, natural {_percent(chosen.natural)}%\n")
    return header + (yaml.safe_dump(data, sort_keys=False) if data else "")


def write_preset(path: Path, definition: dict[str, Any], rows: Sequence[TrialRow], study: str) -> TrialRow:
    """Write the chosen config as a user preset YAML (atomically); returns the chosen trial."""
    chosen = choose(rows, definition)
    if chosen is None:
        raise SweepError(f"the sweep {study!r} has no complete trial yet: run it (without --show) before "
                         f"--write-preset")
    atomic_write_text(Path(path), preset_text(definition, chosen, study))
    return chosen
