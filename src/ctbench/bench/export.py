"""Export the results database: CSV (one file per table), JSON (every table), and one model
card per certified model in the style of RobustBench's ``model_info`` files.

A card is ``<cards>/<dataset>/Linf/<name>.json`` with the model's name, setting, dataset, eps,
architecture, method and seed, ``clean_acc``, ``certified_acc`` and ``adversarial_acc`` (percent,
two decimals; adversarial is null without an attack stage), the verifier (stages, per-sample
timeout, attack), the samples and per-verdict and per-stage counts, and what identifies the
model (config hash, job key, model hash, ctbench and torch versions, git commit, run folder).
With ``suite`` only that suite's rows are exported.
"""
from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, atomic_write_text
from .store import SCHEMA_VERSION, TABLES, StoreError, configured_attack_precision, transaction

JSON_COLUMNS = {"definition", "config", "trainer_test", "overrides", "certify", "analyses", "metrics",
                "certified_by_stage", "falsified_by_stage", "seconds_by_stage", "provenance", "spec", "result",
                "attack"}
_SUITE_JOBS = "SELECT job_key FROM suite_jobs WHERE suite = :suite"
_SUITE_RUNS = f"SELECT config_hash FROM jobs WHERE job_key IN ({_SUITE_JOBS})"
SUITE_FILTERS = {"meta": None, "suites": "name = :suite", "suite_jobs": "suite = :suite",
                 "runs": f"config_hash IN ({_SUITE_RUNS})", "epochs": f"config_hash IN ({_SUITE_RUNS})"}


def _select(connection: sqlite3.Connection, table: str, suite: str | None) -> sqlite3.Cursor:
    condition = SUITE_FILTERS.get(table, f"job_key IN ({_SUITE_JOBS})") if suite else None
    query = f"SELECT * FROM {table}" + (f" WHERE {condition}" if condition else "")
    return connection.execute(query, {"suite": suite} if condition else {})


def check_suite(connection: sqlite3.Connection, suite: str | None) -> None:
    if suite is None:
        return
    known = [row["name"] for row in connection.execute("SELECT name FROM suites ORDER BY name")]
    if suite not in known:
        raise StoreError(f"the database holds no suite {suite!r}; it holds: {', '.join(known) or 'none'}")


def _tables(verdicts: bool) -> tuple[str, ...]:
    return TABLES if verdicts else tuple(table for table in TABLES if table != "verdicts")


def export_csv(connection: sqlite3.Connection, folder: Path, suite: str | None = None,
               verdicts: bool = True) -> list[Path]:
    """``<folder>/<table>.csv`` for every table (JSON columns stay JSON text); ``verdicts=False``
    leaves out the per-sample verdicts."""
    check_suite(connection, suite)
    written = []
    for table in _tables(verdicts):
        cursor = _select(connection, table, suite)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([column[0] for column in cursor.description])
        writer.writerows(tuple(row) for row in cursor)
        path = Path(folder) / f"{table}.csv"
        atomic_write_text(path, buffer.getvalue())
        written.append(path)
    return written


def _plain_row(row: sqlite3.Row) -> dict[str, Any]:
    return {key: json.loads(row[key]) if key in JSON_COLUMNS and row[key] is not None else row[key]
            for key in row.keys()}


def export_json(connection: sqlite3.Connection, path: Path, suite: str | None = None, verdicts: bool = True) -> Path:
    """One JSON object {table: [rows]}, JSON columns decoded; ``verdicts=False`` leaves out the
    per-sample verdicts."""
    check_suite(connection, suite)
    data = {table: [_plain_row(row) for row in _select(connection, table, suite)] for table in _tables(verdicts)}
    atomic_write_json(Path(path), data)
    return Path(path)


def import_json(connection: sqlite3.Connection, path: Path) -> dict[str, int]:
    """Read an ``export_json`` file into the database in one transaction: each row replaces the
    row of the same key (a job, a run, a sample), so importing twice changes nothing. The file
    must have this database's schema version, or version 1 (its runs then take their attack
    precision from their configs); returns the rows read per table."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StoreError(f"no export file {path}; write one with `ctbench bench export --json FILE`") from None
    except json.JSONDecodeError as error:
        raise StoreError(f"{path} is not JSON ({error}); give a file written by `ctbench bench export --json`") \
            from None
    if not isinstance(data, dict) or not set(data) <= set(TABLES) or "runs" not in data:
        raise StoreError(f"{path} is not a `ctbench bench export --json` file (expected an object of the tables "
                         f"{', '.join(TABLES)})")
    versions = {row.get("value") for row in data.get("meta", []) if row.get("key") == "schema_version"}
    if versions == {"1"}:  # version 2 added runs.attack_precision
        for row in data["runs"]:
            row["attack_precision"] = configured_attack_precision(row["method"], row["config"])
    elif versions != {str(SCHEMA_VERSION)}:
        raise StoreError(f"{path} has schema version {', '.join(map(str, versions)) or 'none'}, this ctbench reads "
                         f"versions 1 and {SCHEMA_VERSION}")
    counts = {}
    with transaction(connection):
        for table in TABLES:
            if table == "meta" or table not in data:
                continue
            columns = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
            for row in data[table]:
                if set(row) != set(columns):
                    raise StoreError(f"{path}: a row of table {table} has the columns {sorted(row)}, the database "
                                     f"has {sorted(columns)}")
                values = [json.dumps(row[c], sort_keys=True) if c in JSON_COLUMNS and row[c] is not None else row[c]
                          for c in columns]
                connection.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "
                                   f"VALUES ({', '.join('?' for _ in columns)})", values)
            counts[table] = len(data[table])
    return counts


CARD_QUERY = """
SELECT j.job_key, j.setting, j.method, j.seed, j.source, j.overrides, j.certify, j.config_hash, j.run_dir,
       r.config, r.dataset, r.architecture, r.test_eps, r.package_version, r.torch_version, r.git_commit,
       s.samples, s.natural_accuracy, s.certified_accuracy, s.adversarial_accuracy, s.certified, s.falsified,
       s.wrong, s.unknown, s.timeouts, s.certified_by_stage, s.falsified_by_stage, s.model_hash
FROM jobs j JOIN runs r ON r.config_hash = j.config_hash JOIN results s ON s.job_key = j.job_key
WHERE j.status = 'done' AND s.complete = 1
"""


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def model_card(row: sqlite3.Row) -> dict[str, Any]:
    config, certify = json.loads(row["config"]), json.loads(row["certify"])
    return {
        "name": f"{row['setting']}-{row['method']}-seed{row['seed']}-{row['job_key'][:8]}",
        "setting": row["setting"], "dataset": row["dataset"], "threat_model": "Linf", "eps": row["test_eps"],
        "architecture": row["architecture"], "batch_norm": config["model"]["batch_norm"], "method": row["method"],
        "seed": row["seed"], "preset": row["source"], "overrides": json.loads(row["overrides"]),
        "clean_acc": _percent(row["natural_accuracy"]), "certified_acc": _percent(row["certified_accuracy"]),
        "adversarial_acc": _percent(row["adversarial_accuracy"]),
        "verifier": {"stages": certify["stages"], "timeout": certify["timeout"],
                     "attack": {"steps": certify["attack_steps"], "restarts": certify["attack_restarts"],
                                "apgd": certify.get("apgd", False)}},
        "samples": row["samples"],
        "counts": {key: row[key] for key in ("certified", "falsified", "wrong", "unknown", "timeouts")},
        "certified_by_stage": json.loads(row["certified_by_stage"]),
        "falsified_by_stage": json.loads(row["falsified_by_stage"]),
        "config_hash": row["config_hash"], "job_key": row["job_key"], "model_hash": row["model_hash"],
        "ctbench_version": row["package_version"], "torch_version": row["torch_version"],
        "git_commit": row["git_commit"], "run_dir": row["run_dir"],
    }


def export_cards(connection: sqlite3.Connection, folder: Path, suite: str | None = None) -> list[Path]:
    """One card per done job with a complete certification: ``<folder>/<dataset>/Linf/<name>.json``."""
    check_suite(connection, suite)
    query = CARD_QUERY + (f" AND j.job_key IN ({_SUITE_JOBS})" if suite else "")
    query += " ORDER BY j.setting, j.method, j.seed"
    written = []
    for row in connection.execute(query, {"suite": suite} if suite else {}):
        card = model_card(row)
        path = Path(folder) / card["dataset"] / "Linf" / f"{card['name']}.json"
        atomic_write_json(path, card)
        written.append(path)
    return written
