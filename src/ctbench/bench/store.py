"""The results database: one SQLite file (default ``runs/bench/ctbench.sqlite``).

It is opened in WAL mode with a busy timeout, and every write is one ``BEGIN IMMEDIATE``
transaction, so several writers wait for each other instead of failing or corrupting it. In
``ctbench bench run`` only the coordinating process writes: workers write their run folders,
and the coordinator ingests each finished folder (``ingest_job``; idempotent: a job's rows are
replaced, never duplicated). Paths are absolute; accuracies are fractions in [0, 1]; times are
wall seconds; JSON columns hold JSON text.

Schema (``SCHEMA``; version in ``meta``):

* ``meta(key, value)``: ``schema_version``.
* ``suites(name, path, description, definition, updated_at)``: each suite run; ``definition``
  is the suite's YAML data as JSON.
* ``suite_jobs(suite, job_key)``: which jobs belong to which suite (a job may be in several); a
  whole ``bench run`` of a suite sets its members, a narrowed one (``--only``, ``--seeds``) adds.
* ``runs(config_hash, run_dir, setting, method, seed, dataset, architecture, train_eps,
  test_eps, config, package_version, git_commit, torch_version, device, threads, model_source,
  epochs_completed, trainer_test, attack_precision)``: one trained model per resolved config.
  ``config_hash`` is the job's ``train_key`` (hash of the resolved config and the ctbench
  version), ``config`` the resolved config (JSON), ``trainer_test`` the Trainer's own float32
  test screening (``results.json``); device and threads are those of the train phase;
  ``attack_precision`` what the training attacks ran in, "auto" resolved ("float32",
  "bfloat16", or e.g. "float32+bfloat16" for a run resumed on other hardware; NULL for a method
  that trains without attacks, or where unknown). Version 2 added it; a version 1 database is
  migrated when opened, a version 1 export when imported (the column from the config where it
  names a precision).
* ``jobs(job_key, config_hash, certify_hash, setting, method, seed, source, overrides, certify,
  analyses, run_dir, certify_dir, status, error, updated_at)``: status is "pending", "done",
  "error" (``error`` holds the phase and message, or why the job's worker process or cluster job
  died) or "incomplete" (interrupted).
* ``phases(job_key, phase, status, seconds, error, finished_at, device, threads, torch_version,
  git_commit)``: one row per phase ("train", "certify", "analysis:<name>"), wall seconds summed
  over attempts; a phase that raised has status "error" and the message.
* ``epochs(config_hash, epoch, lr, eps, train_seconds, selected, metrics)``: ``metrics.jsonl``.
* ``results(job_key, eps, samples, decided, complete, natural_accuracy, certified_accuracy,
  adversarial_accuracy, certified, falsified, wrong, unknown, timeouts, certified_by_stage,
  falsified_by_stage, seconds_by_stage, seconds_total, model_hash, provenance)``: the cascade's
  summary. ``unknown`` counts undecided samples that did not time out, ``timeouts`` those that
  did. ``adversarial_accuracy`` is NULL when no stage could falsify (no attack).
* ``verdicts(job_key, sample_index, verdict, outcome, stage, margin_lower, margin_upper, seconds,
  label, predicted, counterexample, detail, model_hash)``: one row per sample. ``verdict`` is
  the cascade's (certified, falsified, wrong, unknown); ``outcome`` splits unknown into
  "timeout" and "unknown"; ``counterexample`` points to the point: ``<dir>/counterexamples/<i>.npy``
  or ``<dir>/verdicts.jsonl#index=<i>`` (inline); ``model_hash`` is the provenance's.
* ``adversarial(job_key, attack_stages, samples, falsified, falsified_by_stage,
  adversarial_accuracy, attack)``: the cascade's attack results (``attack``: steps, restarts).
* ``analyses(job_key, name, status, seconds, spec, result, error)``: chosen analyses.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from .jobs import (
    FALSIFYING_STAGES, Job, analysis_record_path, certify_record_path, read_record, train_record_path,
)

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 120_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suites (
    name TEXT PRIMARY KEY, path TEXT NOT NULL, description TEXT, definition TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suite_jobs (suite TEXT NOT NULL, job_key TEXT NOT NULL, PRIMARY KEY (suite, job_key));
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT PRIMARY KEY, run_dir TEXT NOT NULL, setting TEXT NOT NULL, method TEXT NOT NULL,
    seed INTEGER NOT NULL, dataset TEXT, architecture TEXT, train_eps REAL, test_eps REAL, config TEXT NOT NULL,
    package_version TEXT, git_commit TEXT, torch_version TEXT, device TEXT, threads INTEGER, model_source TEXT,
    epochs_completed INTEGER, trainer_test TEXT, attack_precision TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    job_key TEXT PRIMARY KEY, config_hash TEXT NOT NULL, certify_hash TEXT NOT NULL, setting TEXT NOT NULL,
    method TEXT NOT NULL, seed INTEGER NOT NULL, source TEXT NOT NULL, overrides TEXT NOT NULL, certify TEXT NOT NULL,
    analyses TEXT NOT NULL, run_dir TEXT NOT NULL, certify_dir TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS phases (
    job_key TEXT NOT NULL, phase TEXT NOT NULL, status TEXT NOT NULL, seconds REAL, error TEXT, finished_at TEXT,
    device TEXT, threads INTEGER, torch_version TEXT, git_commit TEXT, PRIMARY KEY (job_key, phase));
CREATE TABLE IF NOT EXISTS epochs (
    config_hash TEXT NOT NULL, epoch INTEGER NOT NULL, lr REAL, eps REAL, train_seconds REAL, selected INTEGER,
    metrics TEXT NOT NULL, PRIMARY KEY (config_hash, epoch));
CREATE TABLE IF NOT EXISTS results (
    job_key TEXT PRIMARY KEY, eps REAL, samples INTEGER, decided INTEGER, complete INTEGER,
    natural_accuracy REAL, certified_accuracy REAL, adversarial_accuracy REAL, certified INTEGER,
    falsified INTEGER, wrong INTEGER, unknown INTEGER, timeouts INTEGER, certified_by_stage TEXT,
    falsified_by_stage TEXT, seconds_by_stage TEXT, seconds_total REAL, model_hash TEXT, provenance TEXT);
CREATE TABLE IF NOT EXISTS verdicts (
    job_key TEXT NOT NULL, sample_index INTEGER NOT NULL, verdict TEXT NOT NULL, outcome TEXT NOT NULL,
    stage TEXT, margin_lower REAL, margin_upper REAL, seconds REAL, label INTEGER, predicted INTEGER,
    counterexample TEXT, detail TEXT, model_hash TEXT, PRIMARY KEY (job_key, sample_index));
CREATE TABLE IF NOT EXISTS adversarial (
    job_key TEXT PRIMARY KEY, attack_stages TEXT NOT NULL, samples INTEGER, falsified INTEGER,
    falsified_by_stage TEXT, adversarial_accuracy REAL, attack TEXT);
CREATE TABLE IF NOT EXISTS analyses (
    job_key TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, seconds REAL, spec TEXT, result TEXT,
    error TEXT, PRIMARY KEY (job_key, name));
"""
TABLES = ("meta", "suites", "suite_jobs", "runs", "jobs", "phases", "epochs", "results", "verdicts", "adversarial",
          "analyses")


class StoreError(RuntimeError):
    """The results database cannot be used (missing, or of another schema)."""


def connect(path: Path | str, create: bool = True) -> sqlite3.Connection:
    """Open the database (WAL, busy timeout, rows as ``sqlite3.Row``), creating the schema."""
    path = Path(path)
    if not create and not path.is_file():
        raise StoreError(f"no results database at {path}; run `ctbench bench run SUITE` first, or pass --db FILE")
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    _create_schema(connection)
    return connection


def _create_schema(connection: sqlite3.Connection) -> None:
    with transaction(connection):
        for statement in filter(str.strip, SCHEMA.split(";")):
            connection.execute(statement)
        connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        found = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if found == "1":  # version 2 added runs.attack_precision
            connection.execute("ALTER TABLE runs ADD COLUMN attack_precision TEXT")
            for row in connection.execute("SELECT config_hash, method, config FROM runs").fetchall():
                connection.execute("UPDATE runs SET attack_precision = ? WHERE config_hash = ?",
                                   (configured_attack_precision(row["method"], json.loads(row["config"])),
                                    row["config_hash"]))
            connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            found = str(SCHEMA_VERSION)
    if int(found) != SCHEMA_VERSION:
        raise StoreError(f"the results database has schema version {found}, this ctbench reads version "
                         f"{SCHEMA_VERSION}; use another --db file")


def configured_attack_precision(method: str, config: dict) -> str | None:
    """The training attacks' precision as the config names it: None for a method that trains
    without attacks, or for "auto" (which only the run's sessions resolve)."""
    from ..methods import METHODS

    precision = config.get("attack", {}).get("precision", "float32")  # float32: the default before "auto"
    if precision == "auto" or (method in METHODS and not METHODS.get(method).trains_with_attacks):
        return None
    return precision


def _attack_precision(job: Job, run_dir: Path) -> str | None:
    """What the run's training attacks ran in, from its sessions (environment.json); the
    config's own value where the sessions do not say."""
    from ..methods import METHODS

    if job.method in METHODS and not METHODS.get(job.method).trains_with_attacks:
        return None
    sessions = (read_record(run_dir / "environment.json") or {}).get("sessions", [])
    ran = [session["attack_precision"] for session in sessions if session.get("attack_precision")]
    return "+".join(dict.fromkeys(ran)) if ran else configured_attack_precision(job.method, job.config)


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (BEGIN IMMEDIATE), committed or rolled back."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# suites and jobs


def register_suite(connection: sqlite3.Connection, suite, jobs: list[Job], root: Path) -> None:
    """Record the suite and its jobs; jobs not yet in the database start as "pending". For a
    whole suite (``suite.whole``) these jobs become its members: jobs of an earlier version of
    its file leave it (their rows stay in the database); a narrowed one adds its jobs. A job
    already in the database keeps its results and takes this suite's preset and overrides as its
    label: the same config, named against today's preset (a preset that adopts an arm's value
    makes that arm's runs its default jobs, and the value it replaced an override)."""
    with transaction(connection):
        connection.execute("INSERT OR REPLACE INTO suites VALUES (?, ?, ?, ?, ?)",
                           (suite.name, str(Path(suite.path).resolve()), suite.description,
                            _json(suite.definition), _now()))
        if suite.whole:
            connection.execute("DELETE FROM suite_jobs WHERE suite = ?", (suite.name,))
        for job in jobs:
            connection.execute("INSERT OR IGNORE INTO suite_jobs VALUES (?, ?)", (suite.name, job.job_key))
            if connection.execute("SELECT 1 FROM jobs WHERE job_key = ?", (job.job_key,)).fetchone() is None:
                _write_job_row(connection, job, root, "pending", None)
            else:
                connection.execute("UPDATE jobs SET source = ?, overrides = ? WHERE job_key = ?",
                                   (job.source, _json(job.record()["overrides"]), job.job_key))


def job_status(connection: sqlite3.Connection, job_key: str) -> str | None:
    row = connection.execute("SELECT status FROM jobs WHERE job_key = ?", (job_key,)).fetchone()
    return None if row is None else row["status"]


def record_job_error(connection: sqlite3.Connection, job_key: str, error: str) -> None:
    """Mark an ingested job as "error" for a reason its phase records cannot hold: its worker
    process or cluster job died outside them (raised, was killed, ran out of memory)."""
    with transaction(connection):
        connection.execute("UPDATE jobs SET status = 'error', error = ?, updated_at = ? WHERE job_key = ?",
                           (error, _now(), job_key))


def _write_job_row(connection: sqlite3.Connection, job: Job, root: Path, status: str, error: str | None) -> None:
    record = job.record()
    connection.execute(
        "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (job.job_key, job.train_key, job.certify_key, job.setting, job.method, job.seed, job.source,
         _json(record["overrides"]), _json(record["certify"]), _json(record["analyses"]),
         str(job.run_dir(root).resolve()), str(job.certify_dir(root).resolve()), status, error, _now()))


# ----------------------------------------------------------------------------------------------
# ingest


def ingest_job(connection: sqlite3.Connection, job: Job, root: Path) -> tuple[str, str | None]:
    """Read the job's run folder into the database, replacing the job's earlier rows, in one
    transaction; returns the job's status ("done", "error", "incomplete" or "pending") and, for
    an error, the phase and its message."""
    root = Path(root)
    phases = _phase_records(job, root)
    status, error = _job_status(phases)
    with transaction(connection):
        _write_run(connection, job, root, phases.get("train"))
        _write_job_row(connection, job, root, status, error)
        _write_phases(connection, job, phases)
        _write_certification(connection, job, root)
        _write_analyses(connection, job, root)
    return status, error


def _phase_records(job: Job, root: Path) -> dict[str, dict]:
    records = {"train": read_record(train_record_path(job, root)),
               "certify": read_record(certify_record_path(job, root))}
    for spec in job.analyses:
        records[f"analysis:{spec.name}"] = read_record(analysis_record_path(job, root, spec))
    return {phase: record for phase, record in records.items() if record is not None}


def _job_status(phases: dict[str, dict]) -> tuple[str, str | None]:
    for phase, record in phases.items():
        if record["status"] == "error":
            return "error", f"{phase}: {record.get('error')}"
    if not phases:
        return "pending", None
    return ("done", None) if all(r["status"] == "done" for r in phases.values()) else ("incomplete", None)


def _write_run(connection: sqlite3.Connection, job: Job, root: Path, train: dict | None) -> None:
    """The run's row and its epochs, once its training has started (a train record exists)."""
    if train is None:
        return
    run_dir = job.run_dir(root)
    environment = train.get("environment", {})
    result = train.get("result") or {}
    trainer_results = read_record(run_dir / "results.json") or {}
    epochs = _metrics(run_dir / "metrics.jsonl")
    config = job.config
    connection.execute(
        "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (job.train_key, str(run_dir.resolve()), job.setting, job.method, job.seed, config["data"]["dataset"],
         config["model"]["architecture"], config["eps"]["train_eps"], config["eps"]["test_eps"], _json(config),
         environment.get("ctbench"), environment.get("git_commit"), environment.get("torch"), result.get("device"),
         environment.get("threads"), trainer_results.get("model"), len(epochs), _json(trainer_results.get("test")),
         _attack_precision(job, run_dir)))
    connection.execute("DELETE FROM epochs WHERE config_hash = ?", (job.train_key,))
    connection.executemany("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (job.train_key, e["epoch"], e.get("lr"), e.get("eps"), e.get("train_seconds"), int(bool(e.get("selected"))),
         _json(e)) for e in epochs])


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_phases(connection: sqlite3.Connection, job: Job, phases: dict[str, dict]) -> None:
    connection.execute("DELETE FROM phases WHERE job_key = ?", (job.job_key,))
    for phase, record in phases.items():
        environment = record.get("environment", {})
        device = (record.get("result") or {}).get("device")
        connection.execute("INSERT INTO phases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (job.job_key, phase, record["status"], record.get("seconds"), record.get("error"),
                            record.get("finished"), device, environment.get("threads"), environment.get("torch"),
                            environment.get("git_commit")))


def _write_certification(connection: sqlite3.Connection, job: Job, root: Path) -> None:
    from ..certify import read_verdicts

    for table in ("results", "verdicts", "adversarial"):
        connection.execute(f"DELETE FROM {table} WHERE job_key = ?", (job.job_key,))
    folder = job.certify_dir(root)
    summary = read_record(folder / "summary.json")
    verdicts = read_verdicts(folder / "verdicts.jsonl")
    connection.executemany("INSERT INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [_verdict_row(job, folder, verdict) for verdict in verdicts])
    if summary is None:
        return
    timeouts = sum(1 for verdict in verdicts if outcome(verdict) == "timeout")
    counts = summary["counts"]
    adversarial = summary["adversarial_accuracy"] if job.certify.finds_counterexamples else None
    provenance = summary.get("provenance") or {}
    connection.execute(
        "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (job.job_key, job.config["eps"]["test_eps"], summary["samples"],
         summary["decided"], int(summary["complete"]), summary["natural_accuracy"], summary["certified_accuracy"],
         adversarial, counts["certified"], counts["falsified"], counts["wrong"], counts["unknown"] - timeouts,
         timeouts, _json(summary["certified_by_stage"]), _json(summary["falsified_by_stage"]),
         _json(summary["seconds_by_stage"]), summary["seconds_total"], provenance.get("model"), _json(provenance)))
    if job.certify.finds_counterexamples:
        stages = [stage for stage in job.certify.stages if stage in FALSIFYING_STAGES]
        connection.execute("INSERT INTO adversarial VALUES (?, ?, ?, ?, ?, ?, ?)", (
            job.job_key, ",".join(stages), summary["samples"], counts["falsified"],
            _json(summary["falsified_by_stage"]), adversarial,
            _json({"steps": job.certify.attack_steps, "restarts": job.certify.attack_restarts,
                   "apgd": job.certify.apgd})))


def outcome(verdict) -> str:
    """The verdict, with "unknown" split into "timeout" (the per-sample budget ran out) and
    "unknown" (no stage could decide)."""
    if verdict.verdict != "unknown":
        return verdict.verdict
    detail = (verdict.detail or "").lower()
    return "timeout" if "timeout" in detail or "time limit" in detail else "unknown"


def _verdict_row(job: Job, folder: Path, verdict) -> tuple:
    pointer = None
    if verdict.counterexample_path is not None:
        pointer = str((folder / verdict.counterexample_path).resolve())
    elif verdict.counterexample is not None:
        pointer = f"{(folder / 'verdicts.jsonl').resolve()}#index={verdict.index}"
    model = verdict.provenance.model if verdict.provenance is not None else None
    return (job.job_key, verdict.index, verdict.verdict, outcome(verdict), verdict.stage, verdict.margin_lower,
            verdict.margin_upper, verdict.seconds, verdict.label, verdict.predicted, pointer, verdict.detail, model)


def _write_analyses(connection: sqlite3.Connection, job: Job, root: Path) -> None:
    connection.execute("DELETE FROM analyses WHERE job_key = ?", (job.job_key,))
    for spec in job.analyses:
        record = read_record(analysis_record_path(job, root, spec))
        if record is not None:
            connection.execute("INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, ?)", (
                job.job_key, spec.name, record["status"], record.get("seconds"), _json(record.get("spec")),
                _json(record.get("result")), record.get("error")))
