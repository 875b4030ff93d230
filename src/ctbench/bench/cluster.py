"""``ctbench bench run --executor slurm|submitit-local``: each task as a submitit job.

submitit (``pip install 'ctbench[cluster]'``) pickles a call of ``phases.run_task`` (what the
local workers run too) for one task (the jobs of one run folder), submits it with sbatch, or for
``submitit-local`` starts it as a local process (the same path without a scheduler), and keeps
the job's script, logs, pickled call and outcome in its ``folder``. The job writes only its run
folder, so the bench root must be on storage that the cluster's nodes and the coordinating
process share; the coordinator polls the job handles and ingests each finished folder: no
cluster job ever writes the results database. A job that reaches its time limit, or is
preempted, is requeued by submitit (``PhasesJob.checkpoint``) and resumes from its run folder.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .jobs import Job
from .phases import run_task
from .runner import available_cores

EXECUTORS = ("local", "slurm", "submitit-local")
DEFAULT_TIME_MINUTES = 24 * 60  # submitit's own default (5 minutes on SLURM, 2 locally) would stop any training


@dataclass(frozen=True)
class SubmititOptions:
    """Where and how the jobs are submitted. ``cluster``: "slurm", or "local" (submitit's
    LocalExecutor); ``folder``: submitit's files (``%j`` in it becomes the job id). The local executor
    uses only the time limit and the GPUs; ``slurm_args`` are further sbatch options (``True``: a
    flag without a value)."""

    cluster: str
    folder: Path
    partition: str | None = None
    time_minutes: int = DEFAULT_TIME_MINUTES
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    slurm_args: dict[str, str | bool] = field(default_factory=dict)


def require_submitit():
    """The submitit module, or a ConfigError that says how to install it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm and submitit-local launch jobs with submitit, which is not installed: "
                          "pip install 'ctbench[cluster]' (or pip install submitit)") from None
    return submitit


def make_executor(options: SubmititOptions):
    """A submitit executor with the options' resources (None: the scheduler's default)."""
    submitit = require_submitit()
    if options.cluster == "slurm" and shutil.which("srun") is None:
        raise ConfigError("--executor slurm found no SLURM here (no srun command): run it on the cluster's login "
                          "node, or use --executor submitit-local to run the jobs on this machine")
    executor = submitit.AutoExecutor(folder=options.folder, cluster=options.cluster)
    executor.update_parameters(timeout_min=options.time_minutes, gpus_per_node=options.gpus_per_job,
                               cpus_per_task=options.cpus_per_job, mem_gb=options.mem_gb,
                               slurm_partition=options.partition,
                               slurm_additional_parameters=dict(options.slurm_args) or None)
    return executor


class PhasesJob:
    """The call a submitit job makes: the task's missing phases with ``threads`` torch threads
    (None: one per core the job was given). Having ``checkpoint`` makes submitit requeue the job
    when it times out or is preempted; the new attempt resumes from the run folder."""

    def __init__(self, task: list[Job], root: str, threads: int | None) -> None:
        self.task, self.root, self.threads = task, root, threads

    def __call__(self) -> None:
        run_task(self.task, self.root, threads=self.threads or available_cores())

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit(executor, task: list[Job], root: Path, threads: int | None):
    """Submit one task; returns submitit's job handle. A refused submission (say, an unknown
    partition) stops the run with sbatch's message."""
    from submitit.core.utils import FailedSubmissionError

    first = task[0]
    executor.update_parameters(name=f"ctbench-{first.setting}-{first.method}-seed{first.seed}")
    try:
        return executor.submit(PhasesJob(task, str(root), threads))
    except FailedSubmissionError as error:
        raise ConfigError(f"submitting {first.label} failed: {error}") from None


def job_error(job) -> str | None:
    """Why a finished submitit job failed (None: it returned): the exception its call raised (the
    last line of the traceback submitit kept), or the first line of submitit's report when the job
    produced no outcome (killed, out of memory), with the job id and its error log."""
    error = job.exception()
    if error is None:
        return None
    framed = str(error).split("-" * 22)  # submitit frames the job's traceback with dashed lines
    if len(framed) > 2:
        reason = _nonblank_lines(framed[1])[-1]
    else:
        reason = _nonblank_lines(str(error))[0]
    return f"{reason} (submitit job {job.job_id}, log {job.paths.stderr})"


def _nonblank_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()] or ["(no message)"]


def cancel(jobs: list) -> None:
    """Cancel submitted jobs (the coordinator was interrupted): a job left running would race the
    next run's resubmission for its run folder. A cancelled job resumes from its files."""
    for job in jobs:
        job.cancel(check=False)
