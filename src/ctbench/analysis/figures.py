"""The paper's section 5 figures from plain data (dicts and lists loaded from stored JSON results).

Each function writes ``<stem>.png`` and ``<stem>.svg`` and returns the two paths. Figures are
drawn on ``matplotlib.figure.Figure`` objects (Agg and SVG canvases), never through pyplot, so
no global backend state is touched.

* Figure 3 / 7: ``unstable_neurons_figure``: grouped bars, one group per method, one bar per
  series (e.g. "train eps 0.1, eval eps 0.3"), unstable-neuron ratio in %.
* Figure 4 / 8: ``utilization_figure``: the same layout for utilization, with an optional
  dashed line for standard training.
* Figure 5: ``tightness_figure``: certified accuracy vs propagation tightness, one point per
  model labelled by method, one panel per setting.
* Figure 6 / 9: ``ood_heatmap``: methods x corruptions, OOD ratio in % (annotated).
* Table 2 / 15 / 16: ``shared_mistakes_figure`` renders the observed vs expected counts as a
  table image; ``shared_mistakes.markdown_table`` gives the text form.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .shared_mistakes import SharedMistakes


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def save_figure(figure, stem: str | Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.svg; returns their paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        figure.savefig(path, bbox_inches="tight")
    return paths


def _ordered_keys(data: Mapping[str, Mapping[str, float]]) -> list[str]:
    keys: list[str] = []
    for values in data.values():
        keys.extend(key for key in values if key not in keys)
    return keys


def _grouped_bars(axes, data: Mapping[str, Mapping[str, float]], percent: bool = True) -> None:
    series = list(data)
    groups = _ordered_keys(data)
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(groups))
    for number, name in enumerate(series):
        values = [data[name].get(group, np.nan) for group in groups]
        values = [100 * v if percent and v is not None else (np.nan if v is None else v) for v in values]
        bars = axes.bar(positions + (number - (len(series) - 1) / 2) * width, values, width, label=name)
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(positions, groups, rotation=30, ha="right")
    if len(series) > 1 or (series and series[0]):
        axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)


def unstable_neurons_figure(data: Mapping[str, Mapping[str, float]], stem: str | Path, *,
                            title: str | None = None) -> list[Path]:
    """Figure 3: ``data`` maps a series label (e.g. "train 0.1 / eval 0.1") to {method: ratio in
    [0, 1]}; bars grouped by method."""
    figure = _figure(max(6.0, 0.9 * len(_ordered_keys(data)) + 2), 3.6)
    axes = figure.add_subplot()
    _grouped_bars(axes, data)
    axes.set_ylabel("unstable neurons [%]")
    if title:
        axes.set_title(title)
    return save_figure(figure, stem)


def utilization_figure(data: Mapping[str, Mapping[str, float]], stem: str | Path, *,
                       standard: float | None = None, title: str | None = None) -> list[Path]:
    """Figure 4: ``data`` maps a series label (e.g. "train eps 0.1") to {method: utilization in
    [0, 1]}; ``standard``: utilization of standard training, drawn as a dashed line."""
    figure = _figure(max(6.0, 0.9 * len(_ordered_keys(data)) + 2), 3.6)
    axes = figure.add_subplot()
    _grouped_bars(axes, data)
    if standard is not None:
        axes.axhline(100 * standard, color="black", linestyle="--", linewidth=1,
                     label=f"standard training ({100 * standard:.2f}%)")
        axes.legend(fontsize=8)
    axes.set_ylabel("active neurons [%]")
    if title:
        axes.set_title(title)
    return save_figure(figure, stem)


def tightness_figure(points: Sequence[Mapping], stem: str | Path, *, title: str | None = None) -> list[Path]:
    """Figure 5: ``points`` are dicts with "method", "tightness" and "certified_accuracy" (both in
    [0, 1]) and optionally "setting" (one panel per setting)."""
    settings: list[str] = []
    for point in points:
        setting = str(point.get("setting", ""))
        if setting not in settings:
            settings.append(setting)
    settings = settings or [""]
    figure = _figure(4.2 * len(settings), 3.6)
    for number, setting in enumerate(settings, start=1):
        axes = figure.add_subplot(1, len(settings), number)
        chosen = [p for p in points if str(p.get("setting", "")) == setting]
        for point in chosen:
            axes.scatter(point["tightness"], 100 * point["certified_accuracy"], s=30)
            axes.annotate(str(point["method"]), (point["tightness"], 100 * point["certified_accuracy"]),
                          textcoords="offset points", xytext=(4, 3), fontsize=8)
        axes.margins(x=0.2, y=0.1)
        axes.set_xlabel("propagation tightness")
        axes.set_ylabel("certified accuracy [%]")
        axes.grid(alpha=0.3)
        if setting:
            axes.set_title(setting, fontsize=10)
    if title:
        figure.suptitle(title)
    return save_figure(figure, stem)


def ood_heatmap(data: Mapping[str, Mapping[str, float]], stem: str | Path, *,
                corruptions: Sequence[str] | None = None, title: str | None = None) -> list[Path]:
    """Figure 6: ``data`` maps a method (row) to {corruption: OOD ratio in [0, 1]}; cells show
    the ratio in %, rounded."""
    rows = list(data)
    columns = list(corruptions) if corruptions is not None else _ordered_keys(data)
    values = np.array([[100 * data[row].get(column, np.nan) for column in columns] for row in rows], dtype=float)
    figure = _figure(max(5.0, 0.55 * len(columns) + 2), max(2.0, 0.4 * len(rows) + 1.6))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isfinite(values[i, j]):
                axes.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if values[i, j] < 60 else "black")
    axes.set_xticks(range(len(columns)), [c.replace("_", "-") for c in columns], rotation=60, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    figure.colorbar(image, ax=axes, label="OOD accuracy / clean accuracy [%]")
    if title:
        axes.set_title(title)
    return save_figure(figure, stem)


def shared_mistakes_figure(results: Mapping[str, SharedMistakes | Mapping], stem: str | Path, *,
                           title: str | None = None) -> list[Path]:
    """Table 2 layout as an image: per setting an "obs." and an "exp." row (expected counts
    rounded), columns = number of runs that certify (or neither / one / both for two runs)."""
    items = [(label, r.as_dict() if isinstance(r, SharedMistakes) else dict(r)) for label, r in results.items()]
    if not items:
        raise ValueError("no results to draw")
    labels = items[0][1]["labels"]
    cells, row_labels = [], []
    for label, row in items:
        cells.append([str(v) for v in row["observed"]])
        cells.append([str(v) for v in row["expected_rounded"]])
        row_labels.extend([f"{label}  obs.", f"{label}  exp."])
    figure = _figure(max(4.0, 0.8 * len(labels) + 2.5), 0.35 * len(cells) + 1.0)
    axes = figure.add_subplot()
    axes.axis("off")
    table = axes.table(cellText=cells, rowLabels=row_labels, colLabels=labels, loc="center", cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.3)
    axes.set_title(title or "# runs that certify: observed vs expected under independence", fontsize=10)
    return save_figure(figure, stem)
