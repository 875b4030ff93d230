"""The coordinator of ``ctbench bench run``: runs what is missing, skips what is done.

A job is done when all its phase records say so (``jobs.job_done``), or when the database has it
as done and its run folder is absent (imported results); done jobs are skipped (ingested first if
the database lacks them). The others are grouped into tasks by run folder
(jobs that differ only in certification share one trained model, and one worker runs them in
turn), and each task runs its missing phases (``phases.run_task``): in this process with
``workers=1``, else in ``workers`` spawned processes (one per task) that split the CPU threads.
Workers write only their run folders; this process alone writes the database, ingesting each
task's jobs as the task finishes. On an interrupt the workers are interrupted too (they record
their phase as interrupted); an interrupted task resumes on the next run from its files.

With ``submitit`` options (``--executor slurm`` or ``submitit-local``) each task is a submitit
job instead of a worker process (``cluster``): the same ``run_task``, the same run folders, and
the same ingestion as each job finishes; a job that failed outside its phase records (it raised,
was killed) is recorded with submitit's reason.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .jobs import STATUS_FILE, Job, job_done
from .phases import run_task
from .store import connect, ingest_job, job_status, record_job_error, register_suite
from .suites import Suite

if TYPE_CHECKING:
    from .cluster import SubmititOptions

POLL_SECONDS = 1.0


class Monitor:
    """What the runner shows while it works; this one shows nothing (the CLI's draws a bar)."""

    def start(self, total: int, skipped: int) -> None:
        """``total`` jobs will run; ``skipped`` were done already."""

    def phases(self, running: dict[str, str]) -> None:
        """The phase of each running task (run folder name -> text such as "certify 10/100")."""

    def job_finished(self, job: Job, status: str, error: str | None) -> None:
        """A job ended with ``status`` (done, error, incomplete)."""

    def close(self) -> None:
        """The run is over."""


@dataclass
class BenchReport:
    """What a run did: job labels that were skipped (done before), done now, and failed (with why)."""

    suite: str
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def run_suite(suite: Suite, root: Path | str, db_path: Path | str, workers: int = 1, threads: int | None = None,
              monitor: Monitor | None = None, submitit: SubmititOptions | None = None) -> BenchReport:
    """Run the suite's missing jobs under ``root`` and ingest them into the database ``db_path``:
    in local processes, or with ``submitit`` options as submitit jobs (SLURM or submitit's local
    executor; ``workers`` then bounds only the local executor's jobs at once)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if submitit is not None:
        from .cluster import make_executor

        executor = make_executor(submitit)  # refuses (no submitit, no SLURM) before anything is registered or run
    root, monitor = Path(root).resolve(), monitor or Monitor()
    connection = connect(db_path)
    report = BenchReport(suite.name)
    try:
        register_suite(connection, suite, list(suite.jobs), root)
        todo = _skip_done(connection, suite.jobs, root, report)
        tasks = _tasks(todo, root)
        monitor.start(len(todo), len(report.skipped))

        def finish(task: list[Job], worker_error: str | None) -> None:
            _ingest_task(connection, task, worker_error, root, report, monitor)

        if submitit is not None:
            _run_with_submitit(tasks, root, executor, submitit, workers, threads, finish, monitor)
        elif workers == 1:
            _run_here(tasks, root, threads, finish, monitor)
        else:
            _run_in_processes(tasks, root, workers, threads, finish, monitor)
    finally:
        monitor.close()
        connection.close()
    return report


def _skip_done(connection, jobs, root: Path, report: BenchReport) -> list[Job]:
    """The jobs still to run. A job is done when its run folder says so (then it is ingested if
    the database lacks it) or when the database has it as done without its folder being here
    (imported with `ctbench bench import` from another machine or an earlier checkout)."""
    todo = []
    for job in jobs:
        status = job_status(connection, job.job_key)
        if job_done(job, root):
            if status != "done":
                ingest_job(connection, job, root)
        elif status != "done" or job.run_dir(root).exists():
            todo.append(job)
            continue
        report.skipped.append(job.label)
    return todo


def _tasks(jobs: list[Job], root: Path) -> list[list[Job]]:
    """Jobs grouped by run folder (in suite order), so one model is never trained twice at once."""
    by_folder: dict[Path, list[Job]] = {}
    for job in jobs:
        by_folder.setdefault(job.run_dir(root), []).append(job)
    return list(by_folder.values())


def _ingest_task(connection, task: list[Job], worker_error: str | None, root: Path, report: BenchReport,
                 monitor: Monitor) -> None:
    """Ingest the task's jobs; a job not done fails with its phase's error, else with the worker's
    (its process or cluster job died outside the phase records), which the database then keeps."""
    for job in task:
        status, error = ingest_job(connection, job, root)
        if status != "done" and error is None and worker_error:
            record_job_error(connection, job.job_key, worker_error)
            status, error = "error", worker_error
        if status == "done":
            report.done.append(job.label)
        else:
            report.failed.append((job.label, error or f"ended {status}"))
        monitor.job_finished(job, status, error)


# ----------------------------------------------------------------------------------------------
# executing tasks

Finish = Callable[[list[Job], str | None], None]


def _run_here(tasks: list[list[Job]], root: Path, threads: int | None, finish: Finish, monitor: Monitor) -> None:
    for task in tasks:
        name = task[0].run_dir(root).name
        run_task(task, str(root), report=lambda text: monitor.phases({name: text}), threads=threads)
        finish(task, None)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _worker(task: list[Job], root: str, threads: int) -> None:
    """A worker process: one task with ``threads`` torch threads; exit code 130 when interrupted
    (SIGINT, also where the coordinator was started with SIGINT ignored, or SIGTERM)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_task(task, root, threads=threads)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_in_processes(tasks: list[list[Job]], root: Path, workers: int, threads: int | None, finish: Finish,
                      monitor: Monitor) -> None:
    """At most ``workers`` spawned processes at once, one per task, ``threads // workers`` torch
    threads each; a task is ingested as soon as its process ends."""
    per_worker = _threads_per_worker(threads, workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    waiting, running = list(tasks), {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                task = waiting.pop(0)
                _clear_status(task, root)
                process = context.Process(target=_worker, args=(task, str(root), per_worker), name=task[0].label)
                process.start()
                running[process] = task
            wait([process.sentinel for process in running], timeout=POLL_SECONDS)
            for process in [process for process in running if not process.is_alive()]:
                code = process.exitcode
                finish(running.pop(process), None if code == 0 else f"worker process exited with code {code}")
            monitor.phases(_phases(running.values(), root))
    except BaseException:
        _stop(list(running))
        raise


def _run_with_submitit(tasks: list[list[Job]], root: Path, executor, options: SubmititOptions, workers: int,
                       threads: int | None, finish: Finish, monitor: Monitor) -> None:
    """One submitit job per task. On SLURM all are submitted at once (the queue decides when they
    run) and each takes one torch thread per CPU it was given; submitit's local executor runs at
    most ``workers`` at once that split the CPU threads like the local workers. A task is ingested
    as soon as submitit reports its job finished."""
    from . import cluster

    on_slurm = options.cluster == "slurm"
    at_once = len(tasks) if on_slurm else workers
    per_job = options.cpus_per_job if on_slurm else _threads_per_worker(threads, workers)
    waiting, running = list(tasks), {}
    try:
        while waiting or running:
            while waiting and len(running) < at_once:
                task = waiting.pop(0)
                _clear_status(task, root)
                running[cluster.submit(executor, task, root, per_job)] = task
            time.sleep(POLL_SECONDS)
            for job in [job for job in running if job.done()]:
                finish(running.pop(job), cluster.job_error(job))
            phases = _phases(running.values(), root)
            if len(running) > len(phases):  # no phase reported yet: waiting in the queue, or starting
                phases["queued"] = f"{len(running) - len(phases)} queued"
            monitor.phases(phases)
    except BaseException:
        cluster.cancel(list(running))
        raise


def _threads_per_worker(threads: int | None, workers: int) -> int:
    """``threads`` (default: every core) split between ``workers`` processes, at least one each."""
    return max(1, (threads or available_cores()) // workers)


def _clear_status(task: list[Job], root: Path) -> None:
    """Remove the task's status file: a stale phase of an earlier run is no progress of this one."""
    (task[0].run_dir(root) / STATUS_FILE).unlink(missing_ok=True)


def _phases(tasks, root: Path) -> dict[str, str]:
    """The phase each running task last reported (its status file), by run folder name."""
    phases = {}
    for task in tasks:
        path = task[0].run_dir(root) / STATUS_FILE
        try:
            phases[path.parent.name] = path.read_text()
        except FileNotFoundError:  # started, nothing reported yet
            continue
    return phases


def _stop(processes: list) -> None:
    """Interrupt the workers (a terminal's Ctrl-C has reached them already), so each records its
    phase as interrupted; terminate any that does not end within a minute."""
    for process in processes:
        process.join(timeout=2)
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
            process.join()
