"""Table 1 (accuracy) and Table 8 (time) of a suite, with the published figures beside ours, and
the A/B table of a suite of config arms against a baseline suite.

Rows are (setting, method) in suite order; a suite with several configs of one method in one
setting gets one labelled row per config, and only the seeds of one config share a row. "Ours"
is the mean and sample standard deviation (n - 1) over the seeds whose job is done with a
complete certification, in percent (Table 1) or seconds (Table 8), and ``Seeds`` says how many
of the suite's seeds that is. Each published
source of ``reference.yaml`` gets its own columns, labelled with the source, and only where the
table has a figure of it; its description and the records' notes become the table's notes.
Later published methods that ctbench does not implement get rows of their own.

A/B: each arm row (jobs with overrides) is paired seed by seed with its nearest baseline: the job
of the same preset, seed and cascade whose overrides are the largest proper subset of the arm's
(the baseline suite's job without overrides when no other arm fits); only seeds done in both
count, and the differences (arm minus baseline, in points) are averaged over those pairs, so the
seed-to-seed spread that two unpaired means share drops out.

Best (Table 1): per setting and column, the highest mean among the certified-training methods
(standard training, PGD and EDAC are not compared, as in the paper), all ties marked; a column
with a single compared figure in a setting marks nothing.
"""
from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import METHODS
from .jobs import Job, content_hash
from .reference import FIGURE_METRICS, Record, Value, load_reference, summary_value
from .suites import Suite

METHOD_ORDER = ("standard", "pgd", "edac", "ibp", "crown_ibp", "sabr", "taps", "staps", "mtl_ibp")
METHOD_NAMES = {"standard": "Standard", "pgd": "PGD", "edac": "EDAC", "ibp": "IBP", "crown_ibp": "CROWN-IBP",
                "sabr": "SABR", "taps": "TAPS", "staps": "STAPS", "mtl_ibp": "MTL-IBP"}
FIGURE_SOURCES = ("literature", "ctbench_paper", "ctbench_paper_seeds", "later_literature", "reference_implementation",
                  "reference_implementation_seeds")
TIME_SOURCES = ("ctbench_paper_times", "reference_implementation_times", "ctbench_before_speed_work")
SHORT = {"natural": "Nat.", "certified": "Cert.", "adversarial": "Adv.", "ibp_certified": "IBP-cert.",
         "train_seconds": "Train s",
         "certify_seconds": "Certify s", "seconds_per_epoch": "s/epoch", "cite": "source",
         "broken": "PGD-broken cert.", "per_seed": "Cert. per seed", "against": "against"}


@dataclass(frozen=True)
class Column:
    """key: machine name (CSV); group: "Ours" or a source's label; metric: what it holds
    ("cite" and "seeds" are text); compared: takes part in best marking."""

    key: str
    group: str
    metric: str
    compared: bool = False

    @property
    def header(self) -> str:
        return f"{self.group} {SHORT.get(self.metric, self.metric)}" if self.metric != "seeds" else "Seeds"


RowKey = tuple[str, str, str]  # setting, method, variant (``_variant``)


@dataclass
class Row:
    """One table row; ``label`` tells apart variants of one method in one setting (else empty)."""

    setting: str
    method: str
    variant: str = ""
    label: str = ""
    cells: dict[str, Value] = field(default_factory=dict)

    @property
    def key(self) -> RowKey:
        return self.setting, self.method, self.variant

    @property
    def method_name(self) -> str:
        name = METHOD_NAMES.get(self.method, self.method)
        return f"{name} ({self.label})" if self.label else name


@dataclass
class Table:
    title: str
    unit: str
    columns: list[Column]
    rows: list[Row]
    best: set[tuple[int, str]] = field(default_factory=set)  # (row number, column key)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# ours, from the database


def _placeholders(keys: list[str]) -> str:
    return ",".join("?" * len(keys))


def _job_rows(connection: sqlite3.Connection, jobs: tuple[Job, ...]) -> dict[str, sqlite3.Row]:
    keys = [job.job_key for job in jobs]
    query = (f"SELECT j.job_key, j.status, r.complete, r.natural_accuracy, r.certified_accuracy, "
             f"r.adversarial_accuracy, r.certified_by_stage, r.samples FROM jobs j LEFT JOIN results r "
             f"ON r.job_key = j.job_key "
             f"WHERE j.job_key IN ({_placeholders(keys)})")
    return {row["job_key"]: row for row in connection.execute(query, keys)} if keys else {}


def _accuracies(row: sqlite3.Row, ibp_stage: bool) -> dict[str, float | None]:
    """A job's accuracies as fractions; IBP-certified is the share the cascade's ibp stage
    certified (None when the cascade has no ibp stage)."""
    by_stage = json.loads(row["certified_by_stage"] or "{}")
    return {"natural": row["natural_accuracy"], "certified": row["certified_accuracy"],
            "adversarial": row["adversarial_accuracy"],
            "ibp_certified": by_stage.get("ibp", 0) / row["samples"] if ibp_stage and row["samples"] else None}


def _variant(job: Job) -> str:
    """What sets a job apart from the other seeds of its row: its config but the seed, and its
    certification (so two configs of one method in one setting are two rows, never averaged)."""
    config = {key: value for key, value in job.config.items() if key != "seed"}
    return content_hash({"config": config, "certify": job.certify.record()}, 8)


def _by_row(jobs: tuple[Job, ...]) -> dict[RowKey, list[Job]]:
    """The suite's jobs by row, in suite order."""
    grouped: dict[RowKey, list[Job]] = {}
    for job in jobs:
        grouped.setdefault((job.setting, job.method, _variant(job)), []).append(job)
    return grouped


def _variant_labels(grouped: dict[RowKey, list[Job]]) -> dict[RowKey, str]:
    """A label (source and overrides) for the rows of a setting and method that has several."""
    counts: dict[tuple[str, str], int] = {}
    for setting, method, _ in grouped:
        counts[(setting, method)] = counts.get((setting, method), 0) + 1
    labels = {}
    for key, jobs in grouped.items():
        if counts[key[:2]] > 1:
            source = Path(jobs[0].source)
            name = source.name if source.suffix in (".yaml", ".yml") else jobs[0].source  # a file, or a preset
            labels[key] = "; ".join([name, *jobs[0].overrides, key[2]])
    return labels


def _ours(connection: sqlite3.Connection, grouped: dict[RowKey, list[Job]]
          ) -> tuple[dict[RowKey, dict[str, Value]], list[str]]:
    """Per row: mean/std of each metric in percent and the seeds cell; and notes on failed jobs."""
    stored = _job_rows(connection, tuple(job for jobs in grouped.values() for job in jobs))
    ours, notes = {}, []
    for key, jobs in grouped.items():
        finished = [row for row in (_done(stored, job) for job in jobs) if row is not None]
        accuracies = [_accuracies(row, "ibp" in jobs[0].certify.stages) for row in finished]
        cells = {metric: summary_value([100 * found[metric] for found in accuracies if found[metric] is not None])
                 for metric in FIGURE_METRICS}
        cells["seeds"] = Value(text=f"{len(finished)}/{len(jobs)}")
        ours[key] = cells
        failed = [j.label for j in jobs if j.job_key in stored and stored[j.job_key]["status"] == "error"]
        if failed:
            notes.append(f"failed (see the jobs table's error): {', '.join(failed)}")
    return ours, notes


def _soundness_cells(connection: sqlite3.Connection, grouped: dict[RowKey, list[Job]]) -> dict[RowKey, Value]:
    """Per row with a finished ``soundness`` analysis: "k of n", the certified samples its strong
    PGD broke out of those it attacked, summed over seeds (k must be 0)."""
    keys = [job.job_key for jobs in grouped.values() for job in jobs]
    results = {row["job_key"]: json.loads(row["result"]) for row in connection.execute(
        f"SELECT job_key, result FROM analyses WHERE name = 'soundness' AND status = 'done' "
        f"AND job_key IN ({_placeholders(keys)})", keys)} if keys else {}
    cells = {}
    for key, jobs in grouped.items():
        audits = [results[job.job_key] for job in jobs if job.job_key in results]
        if audits:
            broken, attacked = sum(a["counterexamples_found"] for a in audits), sum(a["attacked"] for a in audits)
            cells[key] = Value(text=f"{broken} of {attacked:,}")
    return cells


def _soundness_notes(jobs: tuple[Job, ...]) -> list[str]:
    """One note per distinct soundness analysis of the suite: the attack and the samples it saw."""
    specs = {(spec.count, spec.options["steps"], spec.options["restarts"])
             for job in jobs for spec in job.analyses if spec.name == "soundness"}
    return [f"Ours, PGD-broken cert.: certified samples that a PGD of {steps} steps x {restarts} restarts (margin "
            f"loss) misclassifies, over the seeds' certified samples among the first {count:,} test images (the "
            f"analysis soundness; a sound verifier gives 0)" for count, steps, restarts in sorted(specs)]


# ----------------------------------------------------------------------------------------------
# assembling a table


def _rows(grouped: dict[RowKey, list[Job]], records: list[Record]) -> list[Row]:
    """The suite's rows, and rows for later published methods that the suite lacks, ordered by
    setting (suite order), method (``METHOD_ORDER``, then others by name) and suite order."""
    labels = _variant_labels(grouped)
    keys = list(grouped)
    settings = list(dict.fromkeys(setting for setting, _, _ in keys))
    pairs = {key[:2] for key in keys}
    keys += sorted({(r.setting, r.method, "") for r in records if r.source == "later_literature"
                    and r.setting in settings and (r.setting, r.method) not in pairs})

    def order(key: RowKey) -> tuple:
        setting, method, _ = key
        known = method in METHOD_ORDER
        return settings.index(setting), not known, METHOD_ORDER.index(method) if known else 0, method, keys.index(key)

    return [Row(*key, label=labels.get(key, "")) for key in sorted(keys, key=order)]


def _reference_columns(records: list[Record], sources: tuple[str, ...], metrics: tuple[str, ...],
                       compared: bool) -> list[Column]:
    reference = load_reference()
    columns = []
    for source in sources:
        chosen = [r for r in records if r.source == source]
        label = reference.sources[source].label
        columns += [Column(f"{source}_{metric}", label, metric, compared) for metric in metrics
                    if any(metric in r.values for r in chosen)]
        if any(r.cite for r in chosen):
            columns.append(Column(f"{source}_cite", label, "cite"))
    return columns


def _fill_reference(rows: list[Row], records: list[Record]) -> None:
    """Each record's figures into every row of its setting and method."""
    for record in records:
        for row in (row for row in rows if (row.setting, row.method) == (record.setting, record.method)):
            _fill_record(row, record)


def _fill_record(row: Row, record: Record) -> None:
    for metric, value in record.values.items():
        row.cells[f"{record.source}_{metric}"] = value
    if record.cite:
        row.cells[f"{record.source}_cite"] = Value(text=record.cite)


def _notes(records: list[Record], used_sources: list[str]) -> list[str]:
    """Each source's description, then the records' notes (one line per source and text)."""
    reference = load_reference()
    notes = [f"{reference.sources[s].label}: {reference.sources[s].description}." for s in used_sources]
    rows_by_note: dict[tuple[str, str], list[str]] = {}
    for record in records:
        text = "; ".join(part for part in (record.note, f"verifier: {record.verifier}" if record.verifier else None)
                         if part)
        if text:
            name = f"{record.setting} {METHOD_NAMES.get(record.method, record.method)}"
            rows_by_note.setdefault((reference.sources[record.source].label, text), []).append(name)
    notes += [f"{', '.join(names)} ({label}): {text}." for (label, text), names in rows_by_note.items()]
    return notes


def _mark_best(table: Table) -> None:
    for column in (c for c in table.columns if c.compared):
        by_setting: dict[str, list[tuple[int, float]]] = {}
        for number, row in enumerate(table.rows):
            value = row.cells.get(column.key)
            if value is not None and value.mean is not None and _compared_method(row.method):
                by_setting.setdefault(row.setting, []).append((number, round(value.mean, 2)))
        for entries in (entries for entries in by_setting.values() if len(entries) > 1):
            top = max(mean for _, mean in entries)
            table.best |= {(number, column.key) for number, mean in entries if mean == top}


def _compared_method(method: str) -> bool:
    """Certified-training methods (and published ones ctbench lacks) are compared; standard
    training and the adversarial baselines are not."""
    return method not in METHODS or METHODS.get(method).certified


# ----------------------------------------------------------------------------------------------
# the two tables


def accuracy_table(connection: sqlite3.Connection, suite: Suite) -> Table:
    """Table 1: natural, certified and adversarial accuracy per setting and method."""
    grouped = _by_row(suite.jobs)
    ours, failures = _ours(connection, grouped)
    settings = {job.setting for job in suite.jobs}
    rows = _rows(grouped, [r for r in load_reference().figures if r.setting in settings])
    shown = {(row.setting, row.method) for row in rows}
    records = [r for r in load_reference().figures if (r.setting, r.method) in shown]
    for row in rows:
        row.cells.update({f"ours_{name}": value for name, value in ours.get(row.key, {}).items()})
    columns = [Column(f"ours_{metric}", "Ours", metric, True) for metric in FIGURE_METRICS]
    columns += [Column("ours_seeds", "Ours", "seeds")]
    if any(spec.name == "soundness" for job in suite.jobs for spec in job.analyses):
        for key, value in _soundness_cells(connection, grouped).items():
            next(row for row in rows if row.key == key).cells["ours_broken"] = value
        columns += [Column("ours_broken", "Ours", "broken")]
    columns += _reference_columns(records, FIGURE_SOURCES, FIGURE_METRICS, compared=True)
    _fill_reference(rows, records)
    used = [s for s in FIGURE_SOURCES if any(r.source == s for r in records)]
    notes = failures + [_attack_note(suite.jobs)] + _precision_notes(connection, grouped, rows)
    table = Table(f"Table 1, suite {suite.name}: accuracy [%]", "%", columns, rows,
                  notes=notes + _soundness_notes(suite.jobs) + _notes(records, used))
    _mark_best(table)
    return table


def _attack_note(jobs: tuple[Job, ...]) -> str:
    """Which attack gives our adversarial accuracy (per method where the suite's jobs differ)."""
    methods_by_attack: dict[str, list[str]] = {}
    for job in jobs:
        if "attack" in job.certify.stages:
            names = methods_by_attack.setdefault(job.certify.attack_description, [])
            name = METHOD_NAMES.get(job.method, job.method)
            if name not in names:
                names.append(name)
    if not methods_by_attack:
        return "Ours, Adv.: no attack stage in the suite's cascade; only its complete verifier falsifies."
    if len(methods_by_attack) == 1:
        attacks = next(iter(methods_by_attack))
    else:
        attacks = "; ".join(f"{attack} for {', '.join(names)}" for attack, names in sorted(methods_by_attack.items()))
    return ("Ours, Adv.: samples without a counterexample from the certification cascade, whose attack stage is "
            + attacks + "; certified samples are not attacked.")


def _precision_notes(connection: sqlite3.Connection, grouped: dict[RowKey, list[Job]], rows: list[Row]) -> list[str]:
    """What each row's training attacks ran in, per finished job's run (runs.attack_precision:
    "auto" resolved by the hardware of each run), for the rows whose runs recorded it."""
    keys = [job.job_key for jobs in grouped.values() for job in jobs]
    precisions = dict(connection.execute(
        f"SELECT j.job_key, r.attack_precision FROM jobs j JOIN runs r ON r.config_hash = j.config_hash "
        f"WHERE j.status = 'done' AND r.attack_precision IS NOT NULL AND j.job_key IN ({_placeholders(keys)})",
        keys).fetchall()) if keys else {}
    parts = []
    for row in rows:
        counts = Counter(precisions[job.job_key] for job in grouped.get(row.key, []) if job.job_key in precisions)
        if counts:
            runs = ", ".join(f"{precision} in {count} run{'s' if count > 1 else ''}" for precision, count in
                             sorted(counts.items()))
            parts.append(f"{row.setting} {row.method_name}: {runs}")
    if not parts:
        return []
    return ["Ours, precision of the training attacks (attack.precision; auto is bfloat16 where the hardware has fast "
            "bfloat16, else float32): " + "; ".join(parts) + "."]


def time_table(connection: sqlite3.Connection, suite: Suite) -> Table:
    """Table 8: train and certify wall seconds (and seconds per epoch) per setting and method."""
    grouped = _by_row(suite.jobs)
    rows = _rows(grouped, [])
    pairs = {(row.setting, row.method) for row in rows}
    records = [r for r in load_reference().times if (r.setting, r.method) in pairs]
    for row in rows:
        row.cells.update(_our_times(connection, grouped[row.key]))
    metrics = ("train_seconds", "certify_seconds", "seconds_per_epoch")
    columns = [Column(f"ours_{metric}", "Ours", metric) for metric in metrics] + [Column("ours_seeds", "Ours", "seeds")]
    columns += _reference_columns(records, TIME_SOURCES, metrics, compared=False)
    _fill_reference(rows, records)
    used = [s for s in TIME_SOURCES if any(r.source == s for r in records)]
    notes = ["Ours: wall seconds of the train and certify phases (summed over resumed attempts); s/epoch is the "
             "training loop alone (metrics.jsonl train_seconds), without validation."]
    return Table(f"Table 8, suite {suite.name}: wall time [s]", "s", columns, rows, notes=notes + _notes(records, used))


def _our_times(connection: sqlite3.Connection, jobs: list[Job]) -> dict[str, Value]:
    keys = [job.job_key for job in jobs]
    phases = connection.execute(f"SELECT job_key, phase, seconds FROM phases WHERE status = 'done' AND phase IN "
                                f"('train', 'certify') AND job_key IN ({_placeholders(keys)})", keys).fetchall()
    seconds = {(row["job_key"], row["phase"]): row["seconds"] for row in phases}
    runs = [job.train_key for job in jobs]
    epochs = connection.execute(f"SELECT config_hash, AVG(train_seconds) AS mean FROM epochs WHERE config_hash IN "
                                f"({_placeholders(runs)}) GROUP BY config_hash", runs).fetchall()
    done = [job for job in jobs if (job.job_key, "train") in seconds and (job.job_key, "certify") in seconds]
    return {"ours_train_seconds": summary_value([seconds[(j.job_key, "train")] for j in done]),
            "ours_certify_seconds": summary_value([seconds[(j.job_key, "certify")] for j in done]),
            "ours_seconds_per_epoch": summary_value([row["mean"] for row in epochs if row["mean"] is not None]),
            "ours_seeds": Value(text=f"{len(done)}/{len(jobs)}")}


def ab_table(connection: sqlite3.Connection, arms: Suite, baseline: Suite) -> Table:
    """Each arm of ``arms`` against its nearest baseline, paired by seed."""
    pool = {(job.source, job.seed, job.certify_key, frozenset(job.overrides)): job
            for job in (*(job for job in baseline.jobs if not job.overrides), *arms.jobs)}
    grouped = {key: jobs for key, jobs in _by_row(arms.jobs).items() if jobs[0].overrides}
    pairs = {key: [(job, _nearest_baseline(job, pool)) for job in jobs] for key, jobs in grouped.items()}
    stored = _job_rows(connection, tuple(job for twins in pairs.values() for pair in twins for job in pair if job))
    rows = [Row(setting, method, variant, label="; ".join(grouped[(setting, method, variant)][0].overrides))
            for setting, method, variant in grouped]
    for row in rows:
        done = [(_done(stored, arm), _done(stored, base), arm.seed) for arm, base in pairs[row.key] if base]
        done = [(arm, base, seed) for arm, base, seed in done if arm and base]
        ibp = "ibp" in grouped[row.key][0].certify.stages
        arm_values = [_accuracies(arm, ibp) for arm, _, _ in done]
        base_values = [_accuracies(base, ibp) for _, base, _ in done]
        for metric in FIGURE_METRICS:
            found = [(a[metric], b[metric]) for a, b in zip(arm_values, base_values)
                     if a[metric] is not None and b[metric] is not None]
            row.cells[f"baseline_{metric}"] = summary_value([100 * b for _, b in found])
            row.cells[f"arm_{metric}"] = summary_value([100 * a for a, _ in found])
            row.cells[f"delta_{metric}"] = summary_value([100 * (a - b) for a, b in found])
        row.cells["delta_per_seed"] = Value(text=", ".join(
            f"{seed}: {100 * (a['certified'] - b['certified']):+.2f}"
            for (_, _, seed), a, b in zip(done, arm_values, base_values)) or None)
        row.cells["arm_seeds"] = Value(text=f"{len(done)}/{len(pairs[row.key])}")
        against = {"; ".join(base.overrides) or "default" for _, base in pairs[row.key] if base}
        row.cells["baseline_against"] = Value(text=" / ".join(sorted(against)) or None)
    columns = [Column("baseline_against", "Baseline", "against"), Column("arm_seeds", "Arm", "seeds")]
    for metric in ("natural", "certified"):
        columns += [Column(f"baseline_{metric}", "Baseline", metric), Column(f"arm_{metric}", "Arm", metric),
                    Column(f"delta_{metric}", "Δ", metric)]
    columns += [Column(f"delta_{metric}", "Δ", metric) for metric in ("adversarial", "ibp_certified")]
    columns.append(Column("delta_per_seed", "Δ", "per_seed"))
    unpaired = [job.label for jobs in pairs.values() for job, base in jobs if base is None]
    notes = [f"Baseline: the job of the same preset, seed and cascade whose overrides are the largest part of the "
             f"arm's that has a job (Against; default: suite {baseline.name}'s job without overrides), so Δ measures "
             f"the arm's remaining keys; Δ = arm minus baseline in points, "
             f"mean ± sample std over the seeds done in both (Seeds: pairs of the arm's seeds); per seed: seed: Δ certified."]
    if unpaired:
        notes.append("No baseline job (same preset, seed and cascade) for: " + ", ".join(unpaired) + ".")
    return Table(f"A/B, suite {arms.name} against {baseline.name}: accuracy [%]", "%", columns, rows, notes=notes)


def _nearest_baseline(job: Job, pool: dict[tuple, Job]) -> Job | None:
    """The job of ``pool`` with the same preset, seed and cascade whose overrides are the largest
    proper subset of ``job``'s (the default job, with none, last); None if there is none."""
    for size in range(len(job.overrides) - 1, -1, -1):
        for subset in itertools.combinations(job.overrides, size):
            found = pool.get((job.source, job.seed, job.certify_key, frozenset(subset)))
            if found is not None:
                return found
    return None


def _done(stored: dict[str, sqlite3.Row], job: Job) -> sqlite3.Row | None:
    row = stored.get(job.job_key)
    return row if row is not None and row["status"] == "done" and row["complete"] else None
