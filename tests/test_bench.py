"""The benchmark: suites, the runner (skip, resume, workers), the results database under
concurrent writers, Table 1 / Table 8 against the literature, and the exports."""
import csv
import io
import json
import multiprocessing
import shutil
import sqlite3
import statistics
import textwrap
import time

import pytest

from ctbench.bench import connect, ingest_job, load_suite, run_suite
from ctbench.bench import jobs as jobs_module
from ctbench.bench import phases as phases_module
from ctbench.bench.export import export_cards, export_csv, export_json
from ctbench.bench.formats import render
from ctbench.bench.jobs import CERTIFY_RECORD, certify_record_path, read_record, train_record_path
from ctbench.bench.reference import load_reference
from ctbench.bench.store import TABLES, register_suite
from ctbench.bench.suites import SuiteError, parse_seeds
from ctbench.bench.tables import FIGURE_SOURCES, TIME_SOURCES, ab_table, accuracy_table, time_table
from ctbench.certify import Verdict, append_verdicts, summarize
from ctbench.certify.cascade import index_ranges
from ctbench.certify.provenance import Provenance
from ctbench.cli import main
from ctbench.io import atomic_write_json


def count_rows(db_path) -> dict[str, int]:
    with sqlite3.connect(db_path) as connection:
        return {table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in TABLES}


def write_suite(tmp_path, text: str, name: str = "user") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# ----------------------------------------------------------------------------------------------
# the smoke suite end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke suite run once, in 2 spawned worker processes."""
    root = tmp_path_factory.mktemp("bench")
    report = run_suite(load_suite("smoke"), root, root / "ctbench.sqlite", workers=2, threads=2)
    return root, root / "ctbench.sqlite", report


def test_smoke_suite_trains_certifies_analyzes_and_ingests(smoke_run):
    root, db, report = smoke_run
    assert report.failed == [] and len(report.done) == 2
    rows = count_rows(db)
    assert rows["jobs"] == rows["runs"] == rows["results"] == rows["adversarial"] == rows["analyses"] == 2
    assert rows["verdicts"] == 2 * 16 and rows["epochs"] == 2 and rows["phases"] == 2 * 3
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        statuses = {row[0] for row in connection.execute("SELECT status FROM jobs")}
        counts = connection.execute("SELECT SUM(certified + falsified + wrong + unknown + timeouts) FROM results")
        threads = {row[0] for row in connection.execute("SELECT threads FROM phases")}
    assert statuses == {"done"} and counts.fetchone()[0] == 2 * 16 and threads == {1}


def test_a_second_run_redoes_nothing(smoke_run, capsys):
    root, db, _ = smoke_run
    suite = load_suite("smoke")
    checkpoints = {job.job_key: (job.run_dir(root) / "checkpoint.pt").stat().st_mtime_ns for job in suite.jobs}
    verdict_files = {job.job_key: (job.certify_dir(root) / "verdicts.jsonl").stat().st_mtime_ns for job in suite.jobs}
    before = count_rows(db)
    assert main(["bench", "run", "smoke", "--root", str(root), "--quiet"]) == 0
    assert "0 done now, 2 done before, 0 failed" in capsys.readouterr().out
    assert count_rows(db) == before
    for job in suite.jobs:
        assert (job.run_dir(root) / "checkpoint.pt").stat().st_mtime_ns == checkpoints[job.job_key]
        assert (job.certify_dir(root) / "verdicts.jsonl").stat().st_mtime_ns == verdict_files[job.job_key]


def test_an_interrupted_certification_resumes_without_retraining(smoke_run, tmp_path):
    source_root, _, _ = smoke_run
    root = tmp_path / "bench"
    shutil.copytree(source_root, root)
    job = load_suite("smoke").jobs[0]
    checkpoint = (job.run_dir(root) / "checkpoint.pt").stat().st_mtime_ns
    verdicts = job.certify_dir(root) / "verdicts.jsonl"
    lines = verdicts.read_text().splitlines(keepends=True)
    verdicts.write_text("".join(lines[:5]) + lines[5][:20])  # killed in the middle of a write
    (job.certify_dir(root) / CERTIFY_RECORD).unlink()
    report = run_suite(load_suite("smoke"), root, root / "ctbench.sqlite")
    assert report.done == [job.label] and len(report.skipped) == 1
    assert (job.run_dir(root) / "checkpoint.pt").stat().st_mtime_ns == checkpoint
    assert len(verdicts.read_text().splitlines()) == 16
    assert count_rows(root / "ctbench.sqlite")["verdicts"] == 2 * 16


def test_the_soundness_analysis_attacks_the_certified_samples_and_fills_its_column(smoke_run, tmp_path):
    """Added to a suite whose jobs are trained and certified, the analysis runs as a phase of its
    own (nothing retrained or recertified); it attacks exactly the samples the certification
    certified, breaks none, and Table 1 shows "0 of n"."""
    from ctbench.bench.suites import suite_path

    source_root, _, _ = smoke_run
    root = tmp_path / "bench"
    shutil.copytree(source_root, root)
    # the smoke suite's IBP model certifies nothing at 0.1; at eps 0.001 its correct samples
    text = suite_path("smoke").read_text().replace("methods: [ibp, pgd]", "methods: [ibp]")
    text = text.replace("overrides: [", "overrides: [eps.test_eps=0.001, ").replace("count: 16, attack", "count: 64, attack")
    suite = load_suite(write_suite(tmp_path, text, "smoke-small-eps"))
    assert run_suite(suite, root, root / "ctbench.sqlite").failed == []
    job = suite.jobs[0]
    verdicts = job.certify_dir(root) / "verdicts.jsonl"
    checkpoint, verdicts_written = (job.run_dir(root) / "checkpoint.pt").stat().st_mtime_ns, verdicts.stat().st_mtime_ns
    audited = load_suite(write_suite(tmp_path, text.replace(
        "analyses: {utilization: {count: 16}}",
        "analyses: {utilization: {count: 16}, soundness: {count: 64, steps: 5, restarts: 2}}"), "audited"))
    assert [j.job_key for j in audited.jobs] == [job.job_key]
    assert run_suite(audited, root, root / "ctbench.sqlite").done == [job.label]
    assert (job.run_dir(root) / "checkpoint.pt").stat().st_mtime_ns == checkpoint
    assert verdicts.stat().st_mtime_ns == verdicts_written
    certified = sum(json.loads(line)["verdict"] == "certified" for line in verdicts.read_text().splitlines())
    connection = connect(root / "ctbench.sqlite")
    result = json.loads(connection.execute("SELECT result FROM analyses WHERE job_key = ? AND name = 'soundness'",
                                           (job.job_key,)).fetchone()[0])
    assert certified >= 4 and result["attacked"] == certified
    assert result["counterexamples_found"] == 0 and result["max_margin_reached"] < 0
    table = accuracy_table(connection, audited)
    assert "Ours PGD-broken cert." in [column.header for column in table.columns]
    assert table.rows[[row.method for row in table.rows].index("ibp")].cells["ours_broken"].text == f"0 of {certified}"


def test_a_running_phase_keeps_its_seconds_on_disk_so_a_killed_attempt_still_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(phases_module, "HEARTBEAT_SECONDS", 0.02)
    path = tmp_path / "bench-train.json"
    on_disk = []

    def work():
        time.sleep(0.3)
        on_disk.append(read_record(path))  # what a kill -9 at this moment would leave
        return {"trained": True}

    record = phases_module.run_phase(path, work)
    running = on_disk[0]
    assert running["status"] == "running" and 0.15 < running["seconds"] <= record["seconds"]
    time.sleep(0.1)
    assert read_record(path)["status"] == "done"  # no beat lands after the final record
    atomic_write_json(path, running)  # the next attempt after a kill adds its seconds to the killed one's
    assert phases_module.run_phase(path, lambda: None)["seconds"] >= running["seconds"]


def test_an_interrupted_audit_continues_where_it_stopped_with_the_same_result(tmp_path, monkeypatch):
    import torch
    from torch import nn

    from ctbench.bench.analyses import ANALYSES
    from ctbench.certify import audit as audit_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    images = torch.rand(10, 1, 5, 5)
    labels = model(images).argmax(1)
    options, indices = {"steps": 3, "restarts": 2, "batch": 4, "seed": 0}, list(range(100, 110))

    def audit(progress):
        return ANALYSES["soundness"].run(model, images, labels, 0.3, options, indices=indices, progress_path=progress)

    whole = audit(tmp_path / "whole.json")
    attack, batches = audit_module.attack_certified, []

    def interrupted_after_one_batch(*args, **kwargs):
        if batches:
            raise KeyboardInterrupt
        batches.append("first")
        return attack(*args, **kwargs)

    monkeypatch.setattr(audit_module, "attack_certified", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        audit(tmp_path / "progress.json")
    assert json.loads((tmp_path / "progress.json").read_text())["audit"]["attacked"] == 4
    monkeypatch.setattr(audit_module, "attack_certified", lambda *a, **k: batches.append("resumed") or attack(*a, **k))
    assert audit(tmp_path / "progress.json") == whole and whole["attacked"] == 10
    assert batches.count("resumed") == 2 and not (tmp_path / "progress.json").exists()


def test_the_audit_attack_breaks_what_is_not_robust(smoke_run):
    """The audit's PGD is no blank: at a radius no MNIST model withstands it misclassifies, at
    radius 0 it leaves correctly classified samples alone."""
    from ctbench.certify.audit import CertifiedAudit, attack_certified
    from ctbench.cli import load_trained
    from ctbench.data import load_dataset

    root, _, _ = smoke_run
    model, _ = load_trained(str(load_suite("smoke").jobs[0].run_dir(root)))
    test = load_dataset("mnist").test
    images, labels = test.images[:32].float() / 255, test.labels[:32]
    correct = model(images).argmax(1) == labels
    audit = CertifiedAudit(steps=10, restarts=2)
    audit.add(list(range(32)), attack_certified(model, images, labels, 0.5, steps=10, restarts=2))
    assert len(audit.broken_indices) >= 24
    at_zero = attack_certified(model, images, labels, 0.0, steps=3, restarts=1)
    assert bool((at_zero[correct] < 0).all()) and bool((at_zero[~correct] > 0).all())


def test_a_phase_that_raises_is_recorded_as_an_error_and_retried(tmp_path, monkeypatch):
    from ctbench.bench import phases

    def broken(job, root, report):
        raise RuntimeError("verifier exploded")

    monkeypatch.setattr(phases, "certify", broken)
    suite_file = write_suite(tmp_path, """
        certify: {stages: [ibp], count: 4}
        groups:
          - presets: [mnist-mini-0.1/ibp]
            overrides: [data.train_subset=64, data.validation_size=0, optim.epochs=1, eps.ramp_end_epoch=1,
                        evaluation.final_test_count=8, evaluation.attack_steps=1, evaluation.attack_restarts=1]
    """)
    report = run_suite(load_suite(suite_file), tmp_path / "bench", tmp_path / "db.sqlite")
    assert len(report.failed) == 1 and "verifier exploded" in report.failed[0][1]
    with sqlite3.connect(tmp_path / "db.sqlite") as connection:
        phase = connection.execute("SELECT status, error FROM phases WHERE phase = 'certify'").fetchone()
        job = connection.execute("SELECT status, error FROM jobs").fetchone()
    assert phase == ("error", "RuntimeError: verifier exploded")
    assert job[0] == "error" and "certify: RuntimeError: verifier exploded" in job[1]
    monkeypatch.undo()
    report = run_suite(load_suite(suite_file), tmp_path / "bench", tmp_path / "db.sqlite")
    assert report.failed == [] and len(report.done) == 1


# ----------------------------------------------------------------------------------------------
# synthetic run folders


def fake_job_folder(job, root, natural: float, certified: float, adversarial: float, samples: int = 200,
                    timeouts: int = 0) -> None:
    """A finished job's files, with exactly these accuracies (fractions of ``samples``)."""
    wrong = samples - round(natural * samples)
    certified_count, robust = round(certified * samples), round(adversarial * samples)
    provenance = Provenance("model" + job.job_key[:11], job.config["eps"]["test_eps"], "mnist/test@x", "s", "v")
    verdicts = []
    for index in range(samples):
        common = dict(index=index, label=1, eps=job.config["eps"]["test_eps"], provenance=provenance, seconds=0.5)
        if index < wrong:
            verdicts.append(Verdict(verdict="wrong", stage="clean", predicted=2, **common))
        elif index < wrong + certified_count:  # the last certified sample needs CROWN-IBP
            stage = "ibp" if index < wrong + certified_count - 1 else "crown-ibp"
            verdicts.append(Verdict(verdict="certified", stage=stage, predicted=1, margin_lower=0.5, **common))
        elif index < wrong + robust:
            detail = "timeout; domains=3" if index < wrong + certified_count + timeouts else None
            verdicts.append(Verdict(verdict="unknown", stage="bab", predicted=1, detail=detail, **common))
        else:
            verdicts.append(Verdict(verdict="falsified", stage="attack", predicted=2, counterexample=[0.0], **common))
    folder = job.certify_dir(root)
    append_verdicts(folder / "verdicts.jsonl", verdicts)
    summary = summarize(verdicts, range(samples))
    atomic_write_json(folder / "summary.json", {**summary, "selection": index_ranges(range(samples)),
                                                "provenance": provenance.to_json()})
    done = {"status": "done", "seconds": 100.0 + job.seed, "environment": {"threads": 2, "torch": "t"},
            "result": {"device": "cpu"}}
    atomic_write_json(train_record_path(job, root), done)
    atomic_write_json(certify_record_path(job, root), {**done, "seconds": 10.0})
    (job.run_dir(root) / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "lr": 1e-3, "eps": 0.1, "train_seconds": 2.0 + e}) + "\n" for e in range(3)))


SYNTHETIC = {  # (method, seed) -> natural, certified, adversarial
    ("ibp", 0): (0.985, 0.975, 0.980), ("ibp", 1): (0.990, 0.975, 0.980), ("ibp", 2): (0.980, 0.970, 0.975),
    ("sabr", 0): (0.990, 0.985, 0.990), ("sabr", 1): (0.995, 0.985, 0.990),
}


@pytest.fixture
def synthetic_db(tmp_path):
    suite = load_suite(write_suite(tmp_path, """
        certify: {stages: [ibp, crown-ibp, attack, bab], timeout: 100, count: 200}
        groups:
          - settings: [mnist-0.1]
            methods: [ibp, sabr]
            seeds: [0, 1, 2]
    """))
    root, db = tmp_path / "bench", tmp_path / "db.sqlite"
    connection = connect(db)
    register_suite(connection, suite, list(suite.jobs), root)
    for job in suite.jobs:
        if (job.method, job.seed) in SYNTHETIC:
            fake_job_folder(job, root, *SYNTHETIC[(job.method, job.seed)], timeouts=1)
            ingest_job(connection, job, root)
    yield suite, connection, root
    connection.close()


def test_table_shows_mean_and_std_over_seeds_beside_the_literature_and_marks_the_best(synthetic_db):
    suite, connection, _ = synthetic_db
    table = accuracy_table(connection, suite)
    rows = {row.method: row for row in table.rows}
    ibp_natural = rows["ibp"].cells["ours_natural"]
    assert ibp_natural.mean == pytest.approx(98.5) and ibp_natural.n == 3
    assert ibp_natural.std == pytest.approx(statistics.stdev([98.5, 99.0, 98.0]))
    assert rows["sabr"].cells["ours_seeds"].text == "2/3" and rows["ibp"].cells["ours_seeds"].text == "3/3"
    ibp_certified = rows["ibp"].cells["ours_ibp_certified"]  # one sample per model needed CROWN-IBP
    assert ibp_certified.mean == pytest.approx(statistics.fmean([97.0, 97.0, 96.5])) and ibp_certified.n == 3
    assert rows["ibp"].cells["literature_natural"].mean == 98.84
    assert rows["ibp"].cells["literature_cite"].text == "Shi et al. (2021)"
    assert rows["sabr"].cells["ctbench_paper_seeds_certified"].std == 0.03
    assert rows["CC-IBP"].cells["later_literature_certified"].mean == 98.43  # a later published method's own row
    markdown = render(table, "md")
    assert "| mnist-0.1 | IBP | 98.50 ± 0.50 | 97.33 ± 0.29 |" in markdown
    assert "**99.25 ± 0.35**" in markdown and "**98.50 ± 0.00**" in markdown  # SABR's means are the best
    assert "Literature Nat." in markdown and "CTBench paper Cert." in markdown and "Later published Cert." in markdown
    assert "**99.23**" in markdown  # the literature's best natural among IBP and SABR
    assert "Literature: the best published figures before CTBench" in markdown
    latex = render(table, "latex")
    assert r"\textbf{99.25 $\pm$ 0.35}" in latex and r"Shi et al. (2021)" in latex
    lines = render(table, "csv").splitlines()
    header = lines[0].split(",")
    ibp = dict(zip(header, next(line for line in lines if line.startswith("mnist-0.1,ibp,")).split(",")))
    assert float(ibp["ours_natural"]) == pytest.approx(98.5) and float(ibp["ours_natural_std"]) == pytest.approx(0.5)
    assert ibp["literature_certified"] == "97.95"


def test_times_table_and_adversarial_and_timeout_columns(synthetic_db):
    suite, connection, _ = synthetic_db
    table = time_table(connection, suite)
    ibp = next(row for row in table.rows if row.method == "ibp")
    assert ibp.cells["ours_train_seconds"].mean == pytest.approx(101.0)
    assert ibp.cells["ctbench_paper_times_train_seconds"].mean == 2.1e3
    assert "| mnist-0.1 | IBP | 101 ± 1 | 10 ± 0 | 3 ± 0 | 3/3 | 2.1e+03 | 2.5e+03 |" in render(table, "md")
    result = connection.execute("SELECT * FROM results r JOIN jobs j USING (job_key) WHERE j.method = 'ibp' "
                                "AND j.seed = 0").fetchone()
    assert (result["timeouts"], result["unknown"], result["falsified"]) == (1, 0, 1)
    assert result["adversarial_accuracy"] == pytest.approx(0.98)
    outcomes = {row[0] for row in connection.execute("SELECT DISTINCT outcome FROM verdicts")}
    assert outcomes == {"wrong", "certified", "timeout", "falsified"}


def test_export_writes_csv_json_and_model_cards(synthetic_db, tmp_path):
    suite, connection, _ = synthetic_db
    csv_files = export_csv(connection, tmp_path / "csv")
    assert sorted(path.stem for path in csv_files) == sorted(TABLES)
    assert (tmp_path / "csv" / "verdicts.csv").read_text().count("\n") == 1 + 5 * 200
    data = json.loads(export_json(connection, tmp_path / "all.json", suite=suite.name).read_text())
    assert len(data["jobs"]) == 6 and len(data["results"]) == 5 and isinstance(data["runs"][0]["config"], dict)
    cards = export_cards(connection, tmp_path / "cards")
    assert len(cards) == 5 and all(path.parent == tmp_path / "cards" / "mnist" / "Linf" for path in cards)
    card = json.loads(next(path for path in cards if "-ibp-seed0-" in path.name).read_text())
    assert (card["clean_acc"], card["certified_acc"], card["adversarial_acc"]) == (98.5, 97.5, 98.0)
    assert card["verifier"] == {"stages": ["ibp", "crown-ibp", "attack", "bab"], "timeout": 100.0,
                                "attack": {"steps": 50, "restarts": 5, "apgd": False}}
    assert card["counts"]["timeouts"] == 1 and card["eps"] == 0.1 and card["architecture"] == "cnn7"
    for key in ("name", "setting", "dataset", "samples", "config_hash", "ctbench_version", "certified_by_stage"):
        assert key in card


def test_cli_table_and_export(synthetic_db, tmp_path, capsys):
    suite, connection, _ = synthetic_db
    db = str(tmp_path / "db.sqlite")
    assert main(["bench", "table", str(suite.path), "--db", db, "--format", "latex"]) == 0
    assert r"\textbf" in capsys.readouterr().out
    assert main(["bench", "export", "--db", db, "--cards", str(tmp_path / "cards")]) == 0
    assert main(["bench", "export", "--db", db, "--csv", str(tmp_path / "csv")]) == 0
    assert len(list((tmp_path / "csv" / "model_info" / "mnist" / "Linf").glob("*.json"))) == 5
    assert main(["bench", "table", str(suite.path), "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no results database" in capsys.readouterr().err


def test_an_exported_database_imports_into_a_fresh_one_and_its_jobs_count_as_done(synthetic_db, tmp_path, capsys):
    suite, connection, root = synthetic_db
    exported = tmp_path / "kept.json"
    assert main(["bench", "export", "--db", str(tmp_path / "db.sqlite"), "--json", str(exported),
                 "--no-verdicts"]) == 0
    assert "verdicts" not in json.loads(exported.read_text())
    fresh = tmp_path / "fresh.sqlite"
    for _ in range(2):  # importing twice changes nothing
        assert main(["bench", "import", str(exported), "--db", str(fresh)]) == 0
    before = count_rows(tmp_path / "db.sqlite")
    assert count_rows(fresh) == {**before, "verdicts": 0}
    with sqlite3.connect(fresh) as imported:
        assert imported.execute("SELECT COUNT(*) FROM jobs WHERE status = 'done'").fetchone()[0] == 5
    # the run folders are not on this machine: the done jobs are skipped, the missing seed is not
    done_here = [job for job in suite.jobs if (job.method, job.seed) in SYNTHETIC]
    shutil.rmtree(root)
    from ctbench.bench.runner import BenchReport, _skip_done

    report = BenchReport(suite.name)
    with connect(fresh) as reopened:
        todo = _skip_done(reopened, suite.jobs, root, report)
    assert len(report.skipped) == len(done_here) == 5 and [job.label for job in todo] == ["mnist-0.1/sabr seed 2"]
    assert accuracy_table(connect(fresh), suite).rows[0].cells["ours_seeds"].text == "3/3"


def write_sessions(job, root, *precisions):
    """The run's environment.json with one training session per precision."""
    atomic_write_json(job.run_dir(root) / "environment.json",
                      {"sessions": [{"attack_precision": precision, "device": "cpu"} for precision in precisions]})


def test_runs_record_what_their_training_attacks_ran_in_and_the_table_says_it(synthetic_db):
    """runs.attack_precision holds what each run's sessions ran their attacks in ("auto"
    resolved), each precision once, in order; NULL for IBP, which trains without attacks."""
    suite, connection, root = synthetic_db
    jobs = {(job.method, job.seed): job for job in suite.jobs}
    write_sessions(jobs[("sabr", 0)], root, "bfloat16")
    write_sessions(jobs[("sabr", 1)], root, "float32", "bfloat16", "bfloat16")  # resumed on other hardware
    write_sessions(jobs[("ibp", 0)], root, "bfloat16")
    for key in (("sabr", 0), ("sabr", 1), ("ibp", 0)):
        ingest_job(connection, jobs[key], root)
    stored = dict(connection.execute("SELECT config_hash, attack_precision FROM runs").fetchall())
    assert stored[jobs[("sabr", 0)].train_key] == "bfloat16"
    assert stored[jobs[("sabr", 1)].train_key] == "float32+bfloat16"
    assert stored[jobs[("ibp", 0)].train_key] is None and stored[jobs[("ibp", 1)].train_key] is None
    note = next(n for n in accuracy_table(connection, suite).notes if n.startswith("Ours, precision"))
    assert "mnist-0.1 SABR: bfloat16 in 1 run, float32+bfloat16 in 1 run." in note and "IBP" not in note


def test_a_version_1_database_is_migrated_when_opened(tmp_path):
    """Version 1 had no runs.attack_precision: opening it adds the column, filled from each
    run's config where it names a precision, and leaves every other row as it was."""
    from ctbench.bench.store import SCHEMA

    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(SCHEMA.replace(", attack_precision TEXT", ""))
        old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        for key, method, precision in (("a", "sabr", "bfloat16"), ("b", "sabr", "float32"), ("c", "ibp", "float32"),
                                       ("d", "sabr", "auto")):
            old.execute("INSERT INTO runs (config_hash, run_dir, setting, method, seed, config) VALUES (?, ?, ?, ?, ?, ?)",
                        (key, "/r", "mnist-0.1", method, 0, json.dumps({"attack": {"precision": precision}})))
    with connect(path) as migrated:
        assert migrated.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
        assert dict(migrated.execute("SELECT config_hash, attack_precision FROM runs").fetchall()) == \
            {"a": "bfloat16", "b": "float32", "c": None, "d": None}
        assert migrated.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with connect(path) as again:  # a second opening changes nothing
        assert again.execute("SELECT COUNT(*) FROM runs WHERE attack_precision IS NOT NULL").fetchone()[0] == 2


def test_a_version_1_export_imports_with_the_precision_of_its_configs(synthetic_db, tmp_path):
    suite, connection, root = synthetic_db
    data = json.loads(export_json(connection, tmp_path / "v2.json", verdicts=False).read_text())
    data["meta"] = [{"key": "schema_version", "value": "1"}]
    for row in data["runs"]:
        del row["attack_precision"]
        row["config"]["attack"]["precision"] = "bfloat16"
    (tmp_path / "v1.json").write_text(json.dumps(data))
    from ctbench.bench.export import import_json

    with connect(tmp_path / "fresh.sqlite") as fresh:
        import_json(fresh, tmp_path / "v1.json")
        stored = dict(fresh.execute("SELECT method, attack_precision FROM runs").fetchall())
    assert stored == {"sabr": "bfloat16", "ibp": None}


def test_import_refuses_what_is_not_an_export(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"meta": [{"key": "schema_version", "value": "99"}], "runs": []}))
    assert main(["bench", "import", str(tmp_path / "other.json"), "--db", str(tmp_path / "db.sqlite")]) == 2
    assert "schema version 99" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[]")
    assert main(["bench", "import", str(tmp_path / "list.json"), "--db", str(tmp_path / "db.sqlite")]) == 2
    assert "is not a `ctbench bench export --json` file" in capsys.readouterr().err


def test_only_selects_jobs_by_setting_method_and_seed(capsys):
    from ctbench.bench.suites import select_jobs

    suite = load_suite("mnist-mini")
    labels = [job.label for job in select_jobs(suite, ["mnist-mini-0.1/crown_ibp"]).jobs]
    assert labels == [f"mnist-mini-0.1/crown_ibp seed {seed}" for seed in (0, 1, 2)]
    labels = [job.label for job in select_jobs(suite, ["*/ibp/seed1", "mnist-mini-0.3/sabr"]).jobs]
    assert labels == ["mnist-mini-0.1/ibp seed 1", "mnist-mini-0.3/ibp seed 1", "mnist-mini-0.3/sabr seed 0"]
    with pytest.raises(SuiteError, match="matches no job of suite mnist-mini"):
        select_jobs(suite, ["mnist-mini-0.1/crown-ibp"])


def test_reference_data_carries_its_sources():
    reference = load_reference()
    records = {(r.setting, r.method, r.source): r for r in reference.figures}
    assert records[("mnist-0.3", "taps", "ctbench_paper")].values["certified"].mean == 93.95
    assert records[("mnist-0.1", "pgd", "ctbench_paper")].values["certified"].text == "≈0"
    assert records[("tinyimagenet-1_255", "mtl_ibp", "literature")].cite == "De Palma et al. (2024)"
    assert records[("mnist-mini-0.3", "ibp", "reference_implementation_seeds")].values["natural"].n == 3
    assert {r.source for r in reference.figures} <= set(reference.sources)
    times = {(r.setting, r.method, r.source): r for r in reference.times}
    assert times[("mnist-mini-0.1", "sabr", "ctbench_before_speed_work")].values["seconds_per_epoch"].mean == 412.1
    assert {r.source for r in reference.figures} <= set(FIGURE_SOURCES)  # no source left out of the tables
    assert {r.source for r in reference.times} <= set(TIME_SOURCES)


# ----------------------------------------------------------------------------------------------
# concurrent writers


def _ingest_repeatedly(db_path, jobs, root, rounds) -> None:
    connection = connect(db_path)
    for _ in range(rounds):
        for job in jobs:
            ingest_job(connection, job, root)
    connection.close()


def test_concurrent_writers_leave_the_database_intact(synthetic_db, tmp_path):
    suite, _, root = synthetic_db
    jobs = [job for job in suite.jobs if (job.method, job.seed) in SYNTHETIC]
    db = tmp_path / "shared.sqlite"
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    writers = [context.Process(target=_ingest_repeatedly, args=(db, jobs[k:] + jobs[:k], root, 3)) for k in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = count_rows(db)
    assert rows["jobs"] == rows["results"] == 5 and rows["verdicts"] == 5 * 200 and rows["epochs"] == 5 * 3


# ----------------------------------------------------------------------------------------------
# suites and keys


@pytest.mark.parametrize("text,message", [
    ("groups: [{presets: [mnist-0.1/ibpp]}]", "did you mean 'mnist-0.1/ibp'"),
    ("group: []", "unknown key 'group'; valid keys: description, seeds, certify, analyses, groups; "
                  "did you mean 'groups'"),
    ("groups: [{presets: [demo/ibp], seed: [1]}]", "groups[0]: unknown key 'seed'"),
    ("groups: [{presets: [demo/ibp], certify: {stages: [ibp, crown_ibp]}}]", "did you mean 'crown-ibp'"),
    ("groups: [{presets: [demo/ibp]}]\nanalyses: {utilisation: {}}", "did you mean 'utilization'"),
    ("groups: [{presets: [demo/ibp], certify: {count: 0}}]", "groups[0].certify.count: expected an integer >= 1"),
    ("groups: [{presets: [demo/ibp]}]\nanalyses: {soundness: {batch: 0}}",
     "analyses.soundness.batch: expected an integer >= 1"),
    ("groups: [{presets: [demo/ibp], settings: [demo], methods: [ibp]}]", "give exactly one of"),
    ("groups: [{presets: [demo/ibp]}, {settings: [demo], methods: [ibp]}]", "is listed twice"),
    ("groups: [{presets: [demo/ibp], overrides: [optim.lr_x=1]}]", "unknown config key optim.lr_x"),
    ("groups: [{presets: [demo/ibp], seeds: [0, 0]}]", "a seed is listed twice"),
    ("groups: [{configs: [missing.yaml]}]", "missing.yaml does not exist"),
    ("groups: []", "'groups' must be a non-empty list"),
    ("groups: [{settings: [demo], methods: [ibp], setting: x}]", "setting (a row label) goes with presets or configs"),
])
def test_suite_errors_name_the_place_and_the_fix(tmp_path, text, message):
    with pytest.raises(SuiteError) as error:
        load_suite(write_suite(tmp_path, text))
    assert message in str(error.value)


def test_unknown_suites_and_bad_seeds_are_errors(capsys):
    with pytest.raises(SuiteError, match="did you mean 'smoke'"):
        load_suite("smok")
    with pytest.raises(SuiteError, match="comma-separated integers"):
        parse_seeds("0,x")
    assert main(["bench", "run", "paperr"]) == 2
    assert "unknown suite 'paperr'" in capsys.readouterr().err


def test_shipped_suites_resolve_to_the_planned_jobs():
    paper = load_suite("paper")
    assert len(paper.jobs) == 5 * 8 + 5 and {job.method for job in paper.jobs} >= {"standard", "mtl_ibp", "edac"}
    mini = load_suite("mnist-mini")
    seeds = {(job.setting, job.method): sorted(j.seed for j in mini.jobs if (j.setting, j.method) ==
                                               (job.setting, job.method)) for job in mini.jobs}
    assert seeds[("mnist-mini-0.3", "ibp")] == seeds[("mnist-mini-0.1", "ibp")] == [0, 1, 2, 3, 4]
    assert seeds[("mnist-mini-0.1", "mtl_ibp")] == [0, 1, 2, 3, 4]
    assert seeds[("mnist-mini-0.1", "sabr")] == seeds[("mnist-mini-0.1", "crown_ibp")] == [0, 1, 2]
    assert seeds[("mnist-mini-0.1", "taps")] == seeds[("mnist-mini-0.3", "mtl_ibp")] == [0]
    assert len(load_suite("smoke", seeds=[3, 4]).jobs) == 4
    # the paper attacks adversarially trained models with AutoAttack: APGD-CE and APGD-T after PGD
    for job in paper.jobs + mini.jobs:
        assert job.certify.apgd == (job.method in ("standard", "pgd", "edac")), (job.setting, job.method)


def test_job_key_changes_with_the_config_the_certification_and_the_version(tmp_path, monkeypatch):
    def job(overrides="[]", timeout=10):
        path = write_suite(tmp_path, f"""
            certify: {{timeout: {timeout}}}
            groups: [{{presets: [demo/ibp], overrides: {overrides}}}]
        """)
        return load_suite(path).jobs[0]

    base = job()
    assert job().job_key == base.job_key
    other_lr = job("[optim.lr=1e-3]")
    assert other_lr.job_key != base.job_key and other_lr.train_key != base.train_key
    longer = job(timeout=20)
    assert longer.job_key != base.job_key and longer.train_key == base.train_key
    assert longer.run_dir(tmp_path) == base.run_dir(tmp_path)
    assert longer.certify_dir(tmp_path) != base.certify_dir(tmp_path)
    key = base.job_key
    monkeypatch.setattr(jobs_module, "__version__", "9.9.9")
    assert job().job_key != key


def test_attack_precision_keys_only_the_methods_that_train_with_attacks(tmp_path):
    """attack.precision changes what SABR trains, so its jobs differ by it; IBP, CROWN-IBP and
    standard training run no attack, so their jobs (keys, run folders, configs) are the same for
    every precision, float32 included (their key from before the default became auto)."""
    def job(preset, precision, *overrides):
        overrides = ", ".join([*overrides, f"attack.precision={precision}"])
        path = write_suite(tmp_path, f"groups: [{{presets: [{preset}], overrides: [{overrides}]}}]")
        return load_suite(path).jobs[0]

    for preset, *overrides in (("demo/ibp",), ("mnist-mini-0.1/crown_ibp",), ("demo/ibp", "method.name=standard")):
        keys = {job(preset, precision, *overrides).train_key for precision in ("float32", "auto", "bfloat16")}
        assert len(keys) == 1, (preset, overrides)
        assert job(preset, "auto", *overrides).config["attack"]["precision"] == "float32"
    assert len({job("mnist-mini-0.1/sabr", precision).train_key for precision in ("float32", "auto", "bfloat16")}) == 3
    assert job("mnist-mini-0.1/sabr", "auto").config["attack"]["precision"] == "auto"


def test_a_whole_suite_sets_its_members_and_a_narrowed_one_adds_to_them(tmp_path):
    """After its file changes, a whole run of a suite leaves only its present jobs as members
    (its exports then hold nothing of the old version); --only and --seeds only add."""
    from ctbench.bench.suites import select_jobs

    def members(connection):
        return {row[0] for row in connection.execute("SELECT job_key FROM suite_jobs WHERE suite = 'user'")}

    connection, root = connect(tmp_path / "db.sqlite"), tmp_path / "bench"
    first = load_suite(write_suite(tmp_path, "groups: [{presets: [demo/ibp], seeds: [0, 1]}]"))
    register_suite(connection, first, list(first.jobs), root)
    edited = load_suite(write_suite(tmp_path, "groups: [{presets: [demo/ibp], seeds: [0, 1], overrides: [optim.lr=1e-3]}]"))
    register_suite(connection, edited, list(edited.jobs), root)
    assert members(connection) == {job.job_key for job in edited.jobs}
    narrowed = select_jobs(first, ["demo/ibp/seed0"])
    more_seeds = load_suite(str(edited.path), seeds=[2])
    for suite in (narrowed, more_seeds):
        register_suite(connection, suite, list(suite.jobs), root)
    assert members(connection) == {job.job_key for job in (*edited.jobs, *narrowed.jobs, *more_seeds.jobs)}
    assert connection.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 5  # no job row is dropped


def test_a_job_registered_again_takes_the_latest_suites_label_and_keeps_its_results(tmp_path):
    """The same config named two ways (an override equal to the preset's own value): one job, whose
    overrides follow the suite that registered it last, so a preset that adopts an arm's value
    relabels that arm's runs without retraining them."""
    def overrides_of(connection, key):
        return json.loads(connection.execute("SELECT overrides FROM jobs WHERE job_key = ?", (key,)).fetchone()[0])

    connection, root = connect(tmp_path / "db.sqlite"), tmp_path / "bench"
    plain = load_suite(write_suite(tmp_path, "groups: [{presets: [demo/ibp], seeds: [0]}]"))
    named = load_suite(write_suite(tmp_path, "groups: [{presets: [demo/ibp], seeds: [0], overrides: [optim.lr=0.0005]}]"))
    key = plain.jobs[0].job_key
    assert named.jobs[0].job_key == key
    register_suite(connection, plain, list(plain.jobs), root)
    connection.execute("UPDATE jobs SET status = 'done' WHERE job_key = ?", (key,))
    register_suite(connection, named, list(named.jobs), root)
    assert overrides_of(connection, key) == ["optim.lr=0.0005"]
    register_suite(connection, plain, list(plain.jobs), root)
    assert overrides_of(connection, key) == []
    assert connection.execute("SELECT status FROM jobs WHERE job_key = ?", (key,)).fetchone()[0] == "done"


def test_apgd_in_the_attack_stage_is_a_certification_of_its_own(tmp_path):
    """``certify: {apgd: true}`` hands the cascade APGD-CE and APGD-T after PGD: another
    certification (job key) of the same trained model, named in Table 1's attack note; false
    keeps the key a suite without the flag has."""
    def job(certify):
        return load_suite(write_suite(tmp_path, f"""
            certify: {certify}
            groups: [{{presets: [demo/ibp]}}]
        """)).jobs[0]

    plain, off, on = job("{timeout: 10}"), job("{timeout: 10, apgd: false}"), job("{timeout: 10, apgd: true}")
    assert off.job_key == plain.job_key and on.job_key != plain.job_key and on.train_key == plain.train_key
    attack = on.certify.settings().attack
    assert attack.apgd_ce and attack.apgd_t and not plain.certify.settings().attack.apgd_ce
    assert "APGD-CE and APGD-T" in on.certify.attack_description
    with pytest.raises(SuiteError, match="apgd must be true or false"):
        job("{apgd: 1}")
    mixed = load_suite(write_suite(tmp_path, """
        certify: {timeout: 10}
        groups:
          - {presets: [demo/ibp]}
          - {presets: [demo/ibp], overrides: [method.name=pgd], certify: {apgd: true}}
    """))
    note = next(n for n in accuracy_table(connect(tmp_path / "db.sqlite"), mixed).notes if n.startswith("Ours, Adv."))
    assert "PGD 50x5 (margin loss) for IBP;" in note and "APGD-T (100 iterations, 9 targets) for PGD;" in note


def test_a_user_suite_runs_its_own_yaml_configs(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("preset: demo/ibp\noptim: {epochs: 3}\n")
    (tmp_path / "configs" / "plain.yaml").write_text("method: {name: sabr}\nmodel: {architecture: cnn3}\n")
    suite = load_suite(write_suite(tmp_path, """
        seeds: [1]
        groups:
          - configs: [configs/mine.yaml, configs/plain.yaml]
          - configs: [configs/mine.yaml]
            setting: labelled
            overrides: [optim.epochs=4]
    """))
    labels = [(job.setting, job.method, job.seed, job.config["optim"]["epochs"]) for job in suite.jobs]
    assert labels == [("demo", "ibp", 1, 3), ("plain", "sabr", 1, 70), ("labelled", "ibp", 1, 4)]


def test_two_configs_of_one_method_are_two_rows_never_averaged(tmp_path):
    suite = load_suite(write_suite(tmp_path, """
        seeds: [0, 1]
        groups:
          - presets: [mnist-0.1/ibp]
          - presets: [mnist-0.1/ibp]
            overrides: [regularization.l1=0]
    """))
    connection = connect(tmp_path / "db.sqlite")
    rows = [row for row in accuracy_table(connection, suite).rows if row.method == "ibp"]
    assert len(rows) == 2 and {row.cells["ours_seeds"].text for row in rows} == {"0/2"}
    assert rows[0].method_name.startswith("IBP (mnist-0.1/ibp; ") and "regularization.l1=0" in rows[1].method_name
    assert all(row.cells["literature_natural"].mean == 98.84 for row in rows)
    assert len(time_table(connection, suite).rows) == 2


def test_ab_table_pairs_each_arm_with_the_baseline_by_seed(tmp_path, capsys):
    """Differences are taken seed by seed over the seeds done in both, against the nearest
    baseline (the arm whose overrides the arm extends, else the default); an arm certified by
    another cascade has no baseline; the arms suite's own default rows are not arms."""
    baseline = load_suite(write_suite(tmp_path, """
        seeds: [0, 1, 2]
        certify: {stages: [ibp, attack], count: 200}
        groups:
          - presets: [mnist-0.1/ibp]
    """, name="base"))
    arms = load_suite(write_suite(tmp_path, """
        seeds: [0, 1, 2]
        certify: {stages: [ibp, attack], count: 200}
        groups:
          - presets: [mnist-0.1/ibp]
          - presets: [mnist-0.1/ibp]
            overrides: [regularization.l1=0]
          - presets: [mnist-0.1/ibp]
            overrides: [eps.train_eps=0.3]
            certify: {stages: [ibp], count: 200}
          - presets: [mnist-0.1/ibp]
            seeds: [0]
            overrides: [regularization.l1=0, eps.train_eps=0.15]
    """, name="arms"))
    root, db = tmp_path / "bench", tmp_path / "db.sqlite"
    connection = connect(db)
    certified = {((), 0): 0.970, ((), 1): 0.980, ((), 2): 0.990, (("regularization.l1=0",), 0): 0.975,
                 (("regularization.l1=0",), 1): 0.990, (("regularization.l1=0", "eps.train_eps=0.15"), 0): 0.985}
    for suite in (baseline, arms):
        register_suite(connection, suite, list(suite.jobs), root)
    for job in baseline.jobs + arms.jobs:
        key = (job.overrides, job.seed)
        if key in certified and (job in baseline.jobs or job.overrides):
            fake_job_folder(job, root, 0.995, certified[key], 0.995)
            ingest_job(connection, job, root)
    table = ab_table(connection, arms, baseline)
    assert [row.label for row in table.rows] == ["regularization.l1=0", "eps.train_eps=0.3",
                                                 "regularization.l1=0; eps.train_eps=0.15"]
    arm = table.rows[0].cells
    assert arm["arm_seeds"].text == "2/3"
    assert arm["baseline_certified"].mean == pytest.approx(97.5)  # seeds 0 and 1 only, not seed 2's 99.0
    assert arm["delta_certified"].mean == pytest.approx(0.75) and arm["delta_certified"].n == 2
    assert arm["delta_certified"].std == pytest.approx(statistics.stdev([0.5, 1.0]))
    assert arm["delta_natural"].mean == pytest.approx(0.0)
    assert arm["delta_per_seed"].text == "0: +0.50, 1: +1.00"
    assert table.rows[1].cells["arm_seeds"].text == "0/3"
    both = table.rows[2].cells  # paired with the arm it extends, so Δ is the train eps alone
    assert both["baseline_against"].text == "regularization.l1=0" and arm["baseline_against"].text == "default"
    assert both["delta_certified"].mean == pytest.approx(1.0) and both["delta_per_seed"].text == "0: +1.00"
    assert any("No baseline job" in note and "seed 2" in note for note in table.notes)
    connection.close()
    assert main(["bench", "ab", str(tmp_path / "arms.yaml"),
                 "--baseline", str(tmp_path / "base.yaml"), "--db", str(db), "--format", "csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(row["delta_certified"]) == pytest.approx(0.75) and row["delta_per_seed"] == "0: +0.50, 1: +1.00"


def test_each_arm_of_the_arms_suite_changes_its_keys_and_nothing_else():
    """benchmarks/suites/mnist-mini-arms.yaml: every arm's config differs from the suite
    mnist-mini's default job of the same preset and seed exactly in the keys it overrides."""
    from pathlib import Path

    def flat(config, prefix=""):
        for key, value in config.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults = {(job.setting, job.method, job.seed): dict(flat(job.config)) for job in load_suite("mnist-mini").jobs}
    arms = load_suite(str(Path(__file__).parent.parent / "benchmarks" / "suites" / "mnist-mini-arms.yaml"))
    assert len(arms.jobs) == 75
    for job in arms.jobs:
        default, config = defaults[(job.setting, job.method, job.seed)], dict(flat(job.config))
        changed = {key for key in config if config[key] != default.get(key)}
        assert changed == {override.split("=")[0] for override in job.overrides}, job.label
