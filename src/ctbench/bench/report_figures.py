"""The report's figures, drawn with matplotlib ``Figure`` objects (no pyplot, no global backend)
and embedded in the page as base64 PNG data URIs, so the page needs no other file.

* ``training_curves``: one run's epochs: eps and learning rate, training losses, validation
  accuracies (natural, certified, adversarial) per epoch;
* ``stage_counts_figure``: per run, the samples each stage certified or falsified, and the
  wrong, unknown and timed-out ones, as stacked bars;
* ``pareto_figure``: a sweep's trials, validation natural vs certified accuracy, with the front
  drawn and the chosen trial marked;
* ``analysis_figures``: the paper's Figures 3-5 (``ctbench.analysis.figures``) from analysis results.
"""
from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

VALIDATION_CURVES = (("natural_accuracy", "natural"), ("certified_accuracy", "certified (IBP)"),
                     ("crown_ibp_certified_accuracy", "certified (IBP or CROWN-IBP)"),
                     ("adversarial_accuracy", "adversarial (PGD)"))
MIME = {".png": "image/png", ".svg": "image/svg+xml"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90, layout="constrained")


def png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_data_uri(path: Path) -> str:
    """A PNG or SVG file as a data URI."""
    return f"data:{MIME[path.suffix.lower()]};base64," + base64.b64encode(path.read_bytes()).decode()


# ----------------------------------------------------------------------------------------------
# training curves


def training_curves(title: str, epochs: Sequence[Mapping[str, Any]]):
    """Three panels over the epochs: eps and lr, training losses, validation accuracies."""
    figure = _figure(12, 3.0)
    schedule, losses, accuracy = figure.subplots(1, 3)
    from matplotlib.ticker import MaxNLocator

    numbers = [epoch["epoch"] for epoch in epochs]
    _schedule_panel(schedule, numbers, epochs)
    _loss_panel(losses, numbers, epochs)
    _validation_panel(accuracy, numbers, epochs)
    for axes in (schedule, losses, accuracy):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title, fontsize=10)
    return figure


def _schedule_panel(axes, numbers: list[int], epochs) -> None:
    axes.plot(numbers, [epoch.get("eps") for epoch in epochs], "o-", color="tab:blue", label="eps (end of epoch)")
    axes.set_ylabel("eps", color="tab:blue")
    rate = axes.twinx()
    rate.plot(numbers, [epoch.get("lr") for epoch in epochs], "s--", color="tab:orange", label="learning rate")
    rate.set_ylabel("learning rate", color="tab:orange")
    axes.set_xlabel("epoch")
    axes.set_title("schedule", fontsize=9)


def _loss_panel(axes, numbers: list[int], epochs) -> None:
    names = sorted({key for epoch in epochs for key in epoch.get("train", {}) if key.endswith("loss")})
    for name in names:
        axes.plot(numbers, [epoch.get("train", {}).get(name) for epoch in epochs], "o-", label=name.replace("_", " "))
    values = [epoch["train"][name] for epoch in epochs for name in names if name in epoch.get("train", {})]
    if values and min(values) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_title("training losses (epoch mean)", fontsize=9)
    if names:
        axes.legend(fontsize=7)


def _validation_panel(axes, numbers: list[int], epochs) -> None:
    axes.set_xlabel("epoch")
    axes.set_title("validation accuracy [%]", fontsize=9)
    records = [epoch.get("validation") for epoch in epochs]
    if not any(records):
        axes.text(0.5, 0.5, "no validation split\n(data.validation_size = 0)", ha="center", va="center",
                  transform=axes.transAxes, fontsize=9)
        return
    for key, label in VALIDATION_CURVES:
        values = [None if record is None or record.get(key) is None else 100 * record[key] for record in records]
        if any(value is not None for value in values):
            axes.plot(numbers, [float("nan") if v is None else v for v in values], "o-", label=label)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)


# ----------------------------------------------------------------------------------------------
# certification and sweeps


def stage_counts_figure(runs: Mapping[str, Mapping[str, int]]):
    """``runs``: run label -> {column ("certified: ibp", "wrong", ...): samples}; stacked bars."""
    columns = list(dict.fromkeys(column for counts in runs.values() for column in counts))
    figure = _figure(10, 0.45 * len(runs) + 1.4)
    axes = figure.add_subplot()
    labels = list(runs)
    left = [0] * len(labels)
    for column in columns:
        widths = [runs[label].get(column, 0) for label in labels]
        axes.barh(labels, widths, left=left, label=column)
        left = [a + b for a, b in zip(left, widths)]
    axes.invert_yaxis()
    axes.set_xlabel("samples")
    axes.legend(fontsize=7, ncols=min(len(columns), 4), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return figure


def pareto_figure(title: str, points: Sequence[tuple[float, float]], front: Sequence[tuple[float, float]],
                  chosen: tuple[float, float] | None):
    """Validation natural (x) vs certified (y) accuracy in %: every trial, the front as a step
    line, the chosen trial as a star."""
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    axes.scatter([100 * x for x, _ in points], [100 * y for _, y in points], color="tab:gray", label="trials")
    if front:
        axes.step([100 * x for x, _ in front], [100 * y for _, y in front], "o-", where="post", color="tab:red",
                  label="Pareto front")
    if chosen is not None:
        axes.scatter([100 * chosen[0]], [100 * chosen[1]], marker="*", s=250, color="gold", edgecolor="black",
                     zorder=3, label="chosen (best certified)")
    axes.set_xlabel("validation natural accuracy [%]")
    axes.set_ylabel("validation certified accuracy [%]")
    axes.set_title(title, fontsize=9)
    axes.margins(0.1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


# ----------------------------------------------------------------------------------------------
# the paper's analysis figures


def analysis_figures(entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(title, data URI) of Figures 3-5 from analysis entries: dicts with "name" (fragmentation,
    utilization, tightness), "result", "label", "setting" and "certified_accuracy"."""
    from ..analysis import figures

    drawn = []
    with tempfile.TemporaryDirectory() as folder:
        fragmentation = _series(entries, "fragmentation", "sampled_total",
                                lambda e: f"{e['setting']} eps {e['result']['eps']:g}")
        if fragmentation:
            drawn.append(("Figure 3: unstable neurons (sampled)",
                          figures.unstable_neurons_figure(fragmentation, Path(folder) / "fig3")))
        utilization = _series(entries, "utilization", "total", lambda e: e["setting"])
        if utilization:
            drawn.append(("Figure 4: active neurons (utilization)",
                          figures.utilization_figure(utilization, Path(folder) / "fig4")))
        points = [{"method": e["label"], "tightness": e["result"]["final"], "setting": e["setting"],
                   "certified_accuracy": e["certified_accuracy"]} for e in entries
                  if e["name"] == "tightness" and e.get("certified_accuracy") is not None]
        if points:
            drawn.append(("Figure 5: certified accuracy vs propagation tightness",
                          figures.tightness_figure(points, Path(folder) / "fig5")))
        return [(title, file_data_uri(next(path for path in paths if path.suffix == ".png"))) for title, paths in drawn]


def _series(entries, name: str, value: str, series_of) -> dict[str, dict[str, float]]:
    series: dict[str, dict[str, float]] = {}
    for entry in (entry for entry in entries if entry["name"] == name):
        series.setdefault(series_of(entry), {})[entry["label"]] = entry["result"][value]
    return series
