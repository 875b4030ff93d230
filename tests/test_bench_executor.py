"""``ctbench bench run --executor``: the smoke suite through submitit's local executor (the SLURM
code path without a scheduler) gives the local executor's results; a job that raises is recorded
as an error while the others finish, and a rerun resubmits only it; the SLURM options reach
sbatch; without submitit the error says how to install it."""
import contextlib
import importlib.util
import io
import os
import shutil
import sqlite3
import sys
from types import SimpleNamespace

import pytest

from ctbench.bench import cluster, load_suite, run_suite
from ctbench.bench.cluster import SubmititOptions
from ctbench.bench.cli import _submitit_options
from ctbench.cli import build_parser, main

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit is not installed (pip install 'ctbench[cluster]')")


def result_rows(db) -> list[tuple]:
    """Each job's accuracies and verdict counts, in a fixed order."""
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT jobs.setting, jobs.method, jobs.seed, natural_accuracy, certified_accuracy, adversarial_accuracy, "
            "certified, falsified, wrong, unknown, timeouts FROM results JOIN jobs USING (job_key) "
            "ORDER BY jobs.setting, jobs.method, jobs.seed").fetchall()


def job_rows(db) -> dict[str, tuple]:
    with sqlite3.connect(db) as connection:
        return {method: (status, error) for method, status, error in
                connection.execute("SELECT method, status, error FROM jobs")}


def submitit_logs(root) -> list:
    return list((root / "submitit").glob("*_log.out"))  # one per submitted job


@pytest.fixture(scope="module")
def submitit_runs(tmp_path_factory):
    """The smoke suite through submitit's local executor: a first run in which the pgd job's call
    raises (the ibp job is unaffected), then `ctbench bench run` twice more, as a user resumes."""
    class RaisingForPgd(cluster.PhasesJob):  # a local class: pickled into the job by value
        def __call__(self):
            if self.task[0].method == "pgd":
                raise RuntimeError("the node caught fire")
            super().__call__()

    root = tmp_path_factory.mktemp("submitit")
    database = root / "ctbench.sqlite"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster, "PhasesJob", RaisingForPgd)
        first = run_suite(load_suite("smoke"), root, database, workers=2, threads=2,
                          submitit=SubmititOptions(cluster="local", folder=root / "submitit"))
    after_first = job_rows(database), len(submitit_logs(root))
    command = ["bench", "run", "smoke", "--root", str(root), "--executor", "submitit-local", "--workers", "2",
               "--threads", "2", "--quiet"]
    reruns = []
    for _ in range(2):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(command)
        reruns.append((code, out.getvalue(), len(submitit_logs(root))))
    return SimpleNamespace(root=root, database=database, first=first, after_first=after_first, reruns=reruns)


@needs_submitit
def test_a_job_that_raises_is_recorded_as_an_error_and_the_others_finish(submitit_runs):
    report = submitit_runs.first
    assert report.done == ["mnist-mini-0.1/ibp seed 0"]
    [(label, error)] = report.failed
    assert label == "mnist-mini-0.1/pgd seed 0" and error.startswith("RuntimeError: the node caught fire (submitit job")
    jobs, submitted = submitit_runs.after_first
    assert jobs["ibp"] == ("done", None) and submitted == 2
    assert jobs["pgd"][0] == "error" and "RuntimeError: the node caught fire" in jobs["pgd"][1]


@needs_submitit
def test_a_rerun_resubmits_only_the_jobs_not_done(submitit_runs):
    (code, out, submitted), (again_code, again_out, again_submitted) = submitit_runs.reruns
    assert code == 0 and "1 done now, 1 done before, 0 failed" in out and submitted == 3
    assert again_code == 0 and "0 done now, 2 done before, 0 failed" in again_out and again_submitted == 3
    assert {status for status, _ in job_rows(submitit_runs.database).values()} == {"done"}


@needs_submitit
def test_submitit_local_gives_the_results_of_the_local_executor(submitit_runs, tmp_path):
    local = run_suite(load_suite("smoke"), tmp_path, tmp_path / "ctbench.sqlite", workers=2, threads=2)
    assert local.failed == [] and len(local.done) == 2
    rows = result_rows(submitit_runs.database)
    assert len(rows) == 2 and rows == result_rows(tmp_path / "ctbench.sqlite")


@needs_submitit
def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    fake_srun = tmp_path / "bin" / "srun"  # submitit looks for SLURM on the PATH; nothing is submitted here
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}:{os.environ['PATH']}")
    args = build_parser().parse_args([
        "bench", "run", "smoke", "--root", str(tmp_path), "--executor", "slurm", "--slurm-partition", "gpu",
        "--slurm-time", "90", "--slurm-gpus-per-job", "1", "--slurm-cpus-per-job", "8", "--slurm-mem-gb", "32",
        "--slurm-arg", "account=abc", "--slurm-arg", "exclusive"])
    options = _submitit_options(args)
    assert options.folder == tmp_path / "submitit" and options.slurm_args == {"account": "abc", "exclusive": True}
    script = cluster.make_executor(options)._executor._make_submission_file_text("python job.py", "uid")
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 "--account=abc", "--exclusive\n"):
        assert line in script


@needs_submitit
@pytest.mark.skipif(shutil.which("srun") is not None, reason="SLURM is installed here")
def test_slurm_without_slurm_says_so(tmp_path, capsys):
    assert main(["bench", "run", "smoke", "--root", str(tmp_path), "--executor", "slurm", "--quiet"]) == 2
    assert "found no SLURM here (no srun command)" in capsys.readouterr().err
    assert not (tmp_path / "ctbench.sqlite").exists()


def test_slurm_options_need_a_submitit_executor(tmp_path, capsys):
    assert main(["bench", "run", "smoke", "--root", str(tmp_path), "--slurm-partition", "gpu"]) == 2
    assert "--slurm-partition needs --executor slurm" in capsys.readouterr().err
    assert not (tmp_path / "ctbench.sqlite").exists()


def test_without_submitit_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    assert main(["bench", "run", "smoke", "--root", str(tmp_path), "--executor", "slurm", "--quiet"]) == 2
    assert "pip install 'ctbench[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "ctbench.sqlite").exists()  # refused before anything was registered or run
