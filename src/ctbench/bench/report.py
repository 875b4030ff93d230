"""``ctbench bench report``: one self-contained HTML page of a suite's results.

The page needs nothing but itself: the CSS is inline and every figure is a base64 PNG data URI
(``report_figures``); it links to no other file or site. Its sections:

* a header: the ctbench version, git commit, torch version and device of the machine that made
  the report, the date, and the versions, commits and devices the runs were trained with;
* Table 1 (accuracy, the literature beside ours, best in bold) and Table 8 (times), from
  ``tables``;
* certification per stage: per job, the samples each stage certified or falsified and the
  wrong, unknown and timed-out ones (counted from the ``verdicts`` rows), as a table and a figure;
* training curves: per trained run, eps, learning rate, losses and validation accuracy per
  epoch (the ``epochs`` rows);
* analyses: the ``analyses`` rows of the suite's jobs, and the paper's Figures 3-5 drawn from them;
  with ``figure_dirs``, also every PNG (else SVG) figure in those folders (e.g. the output of
  ``ctbench analyze figures``);
* sweeps: when the sweep storage beside the database (``sweep_study.storage_path``) exists,
  each sweep's trials and its natural-vs-certified Pareto front of validation accuracies.
"""
from __future__ import annotations

import datetime
import json
import sqlite3
from html import escape
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import __version__
from ..environment import git_commit
from ..io import atomic_write_text
from .formats import as_html
from .jobs import Job
from .report_figures import (
    analysis_figures, file_data_uri, pareto_figure, png_data_uri, stage_counts_figure, training_curves,
)
from .suites import Suite
from .tables import accuracy_table, time_table

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th { background: #f2f2f2; } td:first-child, td:nth-child(2), th:first-child { text-align: left; }
caption { font-weight: bold; text-align: left; padding: .3em 0; }
b.best { color: #0a5; } ul.notes { font-size: .8em; color: #555; } .note { color: #666; font-size: .9em; }
table.meta td { text-align: left; } img { max-width: 100%; display: block; margin: .4em 0 1.2em; }
nav a { margin-right: 1em; }
"""


def write_report(connection: sqlite3.Connection, suite: Suite, out: Path, sweep_storage: Path | None = None,
                 figure_dirs: Sequence[Path] = ()) -> Path:
    """Write the suite's report page to ``out`` (atomically) and return its path."""
    atomic_write_text(Path(out), report_html(connection, suite, sweep_storage, figure_dirs))
    return Path(out)


def report_html(connection: sqlite3.Connection, suite: Suite, sweep_storage: Path | None = None,
                figure_dirs: Sequence[Path] = ()) -> str:
    sections = [("tables", "Tables", _tables(connection, suite)),
                ("certification", "Certification per stage", _certification(connection, suite)),
                ("training", "Training curves", _training(connection, suite)),
                ("analyses", "Analyses", _analyses(connection, suite, figure_dirs)),
                ("sweeps", "Sweeps", _sweeps(sweep_storage))]
    nav = "<nav>" + "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections) + "</nav>"
    body = "".join(f'<section id="{key}"><h2>{escape(title)}</h2>{html}</section>' for key, title, html in sections)
    title = f"ctbench report: suite {suite.name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"{_header(connection, suite)}{nav}{body}</body></html>\n")


# ----------------------------------------------------------------------------------------------
# header and tables


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def _header(connection: sqlite3.Connection, suite: Suite) -> str:
    runs = _run_rows(connection, suite.jobs)
    trained = {field: sorted({str(row[field]) for row in runs.values() if row[field] is not None})
               for field in ("package_version", "git_commit", "torch_version", "device")}
    facts = [("suite", f"{suite.name}: {suite.description}"), ("jobs", str(len(suite.jobs))),
             ("ctbench", __version__), ("git commit", git_commit() or "not a git checkout"),
             ("torch", torch.__version__), ("device", _device()),
             ("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
             ("runs trained with", "; ".join(f"{field.replace('_', ' ')}: {', '.join(values) or '–'}"
                                             for field, values in trained.items()))]
    return _table(["", ""], facts, css="meta")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{escape(str(text))}</th>" for text in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(title: str, uri: str) -> str:
    caption = escape(title)
    return f'<figure><img alt="{caption}" src="{uri}"><figcaption class="note">{caption}</figcaption></figure>'


def _tables(connection: sqlite3.Connection, suite: Suite) -> str:
    return as_html(accuracy_table(connection, suite)) + as_html(time_table(connection, suite))


# ----------------------------------------------------------------------------------------------
# the database's rows


def _placeholders(values: Sequence) -> str:
    return ",".join("?" * len(values))


def _run_rows(connection: sqlite3.Connection, jobs: Sequence[Job]) -> dict[str, sqlite3.Row]:
    keys = sorted({job.train_key for job in jobs})
    rows = connection.execute(f"SELECT * FROM runs WHERE config_hash IN ({_placeholders(keys)})", keys)
    return {row["config_hash"]: row for row in rows}


def _labels(jobs: Sequence[Job]) -> dict[str, str]:
    """A label per job key: "setting/method seed S", with the job key where that is not unique."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.label] = counts.get(job.label, 0) + 1
    return {job.job_key: job.label if counts[job.label] == 1 else f"{job.label} [{job.job_key[:8]}]" for job in jobs}


def _none_yet(what: str) -> str:
    return f'<p class="note">No {what} in the database for this suite yet (run `ctbench bench run`).</p>'


# ----------------------------------------------------------------------------------------------
# certification


def stage_counts(connection: sqlite3.Connection, jobs: Sequence[Job]) -> dict[str, dict[str, int]]:
    """Per job key: samples per outcome and stage ("certified: ibp", "falsified: attack",
    "wrong", "unknown", "timeout"), counted from the per-sample verdicts, or, for a job whose
    verdicts the database does not hold (imported from a ``bench export --no-verdicts``), taken
    from its certification summary."""
    keys = [job.job_key for job in jobs]
    rows = [dict(row) for row in connection.execute(
        f"SELECT job_key, outcome, stage, COUNT(*) AS n FROM verdicts WHERE job_key IN "
        f"({_placeholders(keys)}) GROUP BY job_key, outcome, stage", keys)]
    with_verdicts = {row["job_key"] for row in rows}
    rows += _summary_counts(connection, [key for key in keys if key not in with_verdicts])
    stages = {job.job_key: job.certify.stages for job in jobs}
    counts: dict[str, dict[str, int]] = {}
    for row in sorted(rows, key=lambda r: _column_order(r["outcome"], r["stage"], stages[r["job_key"]])):
        column = f"{row['outcome']}: {row['stage']}" if row["outcome"] in ("certified", "falsified") else row["outcome"]
        job = counts.setdefault(row["job_key"], {})
        job[column] = job.get(column, 0) + row["n"]
    return counts


def _summary_counts(connection: sqlite3.Connection, keys: list[str]) -> list[dict]:
    """The rows ``stage_counts`` reads from verdicts, from the results table's counts instead."""
    rows = []
    for result in connection.execute(
            "SELECT job_key, certified_by_stage, falsified_by_stage, wrong, unknown, timeouts FROM results "
            f"WHERE job_key IN ({_placeholders(keys)})", keys):
        key = result["job_key"]
        for outcome in ("certified", "falsified"):
            rows += [{"job_key": key, "outcome": outcome, "stage": stage, "n": n}
                     for stage, n in json.loads(result[f"{outcome}_by_stage"] or "{}").items() if n]
        rows += [{"job_key": key, "outcome": outcome, "stage": None, "n": result[column]}
                 for outcome, column in {"wrong": "wrong", "unknown": "unknown", "timeout": "timeouts"}.items()
                 if result[column]]
    return rows


def _column_order(outcome: str, stage: str | None, stages: Sequence[str]) -> tuple:
    order = ("certified", "falsified", "wrong", "unknown", "timeout")
    return (order.index(outcome) if outcome in order else len(order),
            stages.index(stage) if stage in stages else len(stages))


def _certification(connection: sqlite3.Connection, suite: Suite) -> str:
    counts = stage_counts(connection, suite.jobs)
    if not counts:
        return _none_yet("verdicts")
    labels = _labels(suite.jobs)
    keys = list(counts)
    results = {row["job_key"]: row for row in connection.execute(
        f"SELECT job_key, samples, complete, seconds_total FROM results WHERE job_key IN ({_placeholders(keys)})",
        keys)}
    columns = list(dict.fromkeys(column for job in counts.values() for column in job))
    rows = []
    for key in keys:
        result = results.get(key)
        summary = [result["samples"], "yes" if result["complete"] else "no", f"{result['seconds_total']:.3g}"] \
            if result is not None else ["–", "no", "–"]
        rows.append([labels[key], *(counts[key].get(column, 0) for column in columns), *summary])
    figure = stage_counts_figure({labels[key]: counts[key] for key in keys})
    return (_table(["run", *columns, "samples", "complete", "seconds"], rows)
            + _image("samples per verdict and stage", png_data_uri(figure)))


# ----------------------------------------------------------------------------------------------
# training curves


def _training(connection: sqlite3.Connection, suite: Suite) -> str:
    parts = []
    trained = {}
    for job in suite.jobs:  # jobs that differ only in certification share one run
        trained.setdefault(job.train_key, job)
    for key, job in trained.items():
        epochs = [json.loads(row["metrics"]) for row in connection.execute(
            "SELECT metrics FROM epochs WHERE config_hash = ? ORDER BY epoch", (key,))]
        if epochs:
            title = f"{job.setting}/{job.method} seed {job.seed} (run {key[:10]})"
            parts.append(_image(title, png_data_uri(training_curves(title, epochs))))
    return "".join(parts) or _none_yet("epochs")


# ----------------------------------------------------------------------------------------------
# analyses


def _analysis_entries(connection: sqlite3.Connection, suite: Suite) -> list[dict[str, Any]]:
    jobs = {job.job_key: job for job in suite.jobs}
    keys = list(jobs)
    labels = _labels(suite.jobs)
    rows = connection.execute(
        f"SELECT a.*, r.certified_accuracy FROM analyses a LEFT JOIN results r ON r.job_key = a.job_key "
        f"WHERE a.job_key IN ({_placeholders(keys)}) ORDER BY a.job_key, a.name", keys).fetchall()
    return [{"label": labels[row["job_key"]], "setting": jobs[row["job_key"]].setting, "name": row["name"],
             "status": row["status"], "seconds": row["seconds"], "error": row["error"],
             "result": json.loads(row["result"]) if row["result"] else None,
             "certified_accuracy": row["certified_accuracy"]} for row in rows]


def _summary(result: dict[str, Any] | None) -> str:
    """The scalar values of an analysis result (its per-layer lists stay in the database)."""
    if not result:
        return ""
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in result.items() if isinstance(value, (int, float, str)))


def _analyses(connection: sqlite3.Connection, suite: Suite, figure_dirs: Sequence[Path]) -> str:
    entries = _analysis_entries(connection, suite)
    parts = []
    if entries:
        rows = [[e["label"], e["name"], e["status"], "–" if e["seconds"] is None else f"{e['seconds']:.3g}",
                 e["error"] or _summary(e["result"])] for e in entries]
        parts.append(_table(["run", "analysis", "status", "seconds", "result"], rows))
        done = [e for e in entries if e["status"] == "done" and e["result"]]
        parts += [_image(title, uri) for title, uri in analysis_figures(done)]
    parts += [_image(path.name, file_data_uri(path)) for path in _figure_files(figure_dirs)]
    return "".join(parts) or _none_yet("analyses")


def _figure_files(folders: Sequence[Path]) -> list[Path]:
    """The PNG figures in the folders, and the SVG ones that have no PNG twin."""
    files = []
    for folder in map(Path, folders):
        pngs = sorted(folder.glob("*.png"))
        files += pngs + [svg for svg in sorted(folder.glob("*.svg")) if svg.with_suffix(".png") not in pngs]
    return files


# ----------------------------------------------------------------------------------------------
# sweeps


def _sweeps(storage: Path | None) -> str:
    if storage is None or not Path(storage).is_file():
        return '<p class="note">No sweeps beside this database (`ctbench sweep` makes them).</p>'
    try:
        import optuna
    except ImportError:
        return (f'<p class="note">{escape(str(storage))} holds sweeps; install Optuna (pip install '
                f"'ctbench[sweep]') to show them.</p>")
    from .sweep_study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_storage(storage)
    names = optuna.get_all_study_names(opened)
    return "".join(_sweep(optuna.load_study(study_name=name, storage=opened)) for name in names) or \
        '<p class="note">The sweep storage holds no study yet.</p>'


def _sweep(study) -> str:
    from .sweep_results import choose, complete_points, front_of, trial_rows

    rows = trial_rows(study)
    definition = study.user_attrs.get("definition", {})
    front, chosen = front_of(rows), choose(rows, definition or None)
    points = [(row.natural, row.certified) for row in complete_points(rows)]
    figure = pareto_figure(study.study_name, points, [(row.natural, row.certified) for row in front],
                           None if chosen is None else (chosen.natural, chosen.certified))
    on_front = {row.number for row in front}
    table = [[row.number, row.state.lower(), row.label, _percent(row.certified), _percent(row.natural),
              ("front " if row.number in on_front else "") + ("chosen" if chosen and row.number == chosen.number
                                                               else ""), row.error or ""] for row in rows]
    about = (f"preset {definition.get('preset', '?')}, fixed overrides {definition.get('overrides', [])}, "
             f"seeds {definition.get('seeds', [])}; validation accuracies in %")
    return (f"<h3>{escape(study.study_name)}</h3><p class=\"note\">{escape(about)}</p>"
            + _image(f"{study.study_name}: natural vs certified validation accuracy", png_data_uri(figure))
            + _table(["trial", "state", "config", "cert. %", "nat. %", "", "error"], table))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"
