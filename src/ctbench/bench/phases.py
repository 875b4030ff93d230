"""The phases of a job, as a worker runs them: train -> certify -> analyses.

A worker writes only its run folder (``jobs`` describes the layout): the Trainer's files, the
cascade's verdicts, and one phase record per phase (``bench-train.json``,
``certify-*/bench-certify.json``, ``analyses/<name>.json``), written atomically. A record holds
``status`` ("running", "done", "error" with ``error`` and ``traceback``, or "interrupted"),
``seconds`` (wall time summed over every attempt), ``finished`` (UTC time) and the
``environment`` it ran in (torch version, device, threads, ctbench version, git commit). While a
phase runs, its record's seconds are rewritten every ``HEARTBEAT_SECONDS``, so an attempt that is
killed (kill -9, the end of a session) still counts, less at most that interval.

A phase that is done is skipped; one that is not resumes: training from ``checkpoint.pt``,
certification from its verdicts file. A phase that raises is recorded as an error and the
job's later phases are not run. The adversarial accuracy is no phase of its own: it comes from
the attack stage of the cascade.
"""
from __future__ import annotations

import datetime
import functools
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import FILES_DATASET
from ..environment import environment
from ..io import atomic_write_json, atomic_write_text
from .analyses import ANALYSES
from .jobs import (
    STATUS_FILE, AnalysisSpec, Job, analysis_record_path, certify_record_path, phase_done, read_record,
    train_record_path,
)

Report = Callable[[str], None]  # shows the phase a job is in, e.g. "certify 128/1000"


def run_task(jobs: list[Job], root: str, report: Report | None = None, threads: int | None = None) -> None:
    """Run the missing phases of jobs that share one run folder, in order, with ``threads`` torch
    CPU threads (None: as they are). This is what every executor runs (in its process, a worker
    process or a cluster job). ``report`` defaults to writing the run folder's status file, which
    the coordinator reads for its progress bar."""
    if threads:
        torch.set_num_threads(threads)
    root_path = Path(root)
    report = report or functools.partial(_write_status, jobs[0].run_dir(root_path) / STATUS_FILE)
    for job in jobs:
        run_job(job, root_path, report)


def run_job(job: Job, root: Path, report: Report) -> None:
    """The job's phases, each only when not done; stops at the first error (its record says it)."""
    steps = [(train_record_path(job, root), None, functools.partial(train, job, root, report)),
             (certify_record_path(job, root), None, functools.partial(certify, job, root, report))]
    for spec in job.analyses:
        steps.append((analysis_record_path(job, root, spec), spec.record(),
                      functools.partial(analyze, job, root, spec, report)))
    for path, spec_record, work in steps:
        if phase_done(path, spec_record):
            continue
        if run_phase(path, work, spec_record)["status"] == "error":
            return


HEARTBEAT_SECONDS = 30.0


def run_phase(path: Path, work: Callable[[], dict | None], spec: dict | None = None) -> dict[str, Any]:
    """Run ``work`` and keep its record at ``path``: seconds add up over attempts; an exception
    becomes status "error" (KeyboardInterrupt: "interrupted", then re-raised)."""
    previous = read_record(path) or {}
    spent = float(previous.get("seconds", 0.0)) if previous.get("status") != "done" else 0.0
    record: dict[str, Any] = {"status": "running", "seconds": spent, "spec": spec, "environment": environment()}
    atomic_write_json(path, record)
    started = time.perf_counter()
    stop = threading.Event()
    heartbeat = threading.Thread(target=_beat, args=(path, dict(record), started, stop), daemon=True)
    heartbeat.start()
    try:
        record["result"] = work()
        record["status"] = "done"
    except Exception as error:  # a phase's failure is a result to record, not a crash of the benchmark
        record.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    except BaseException:
        _stop(heartbeat, stop)
        _finish(path, record, started, "interrupted")
        raise
    _stop(heartbeat, stop)
    return _finish(path, record, started, record["status"])


def _beat(path: Path, running: dict, started: float, stop: threading.Event) -> None:
    """Rewrite the running record with the seconds spent so far, until ``stop``."""
    while not stop.wait(HEARTBEAT_SECONDS):
        atomic_write_json(path, {**running, "seconds": running["seconds"] + time.perf_counter() - started})


def _stop(heartbeat: threading.Thread, stop: threading.Event) -> None:
    stop.set()
    heartbeat.join()  # no beat may land after the final record


def _finish(path: Path, record: dict, started: float, status: str) -> dict:
    record.update(status=status, seconds=record["seconds"] + time.perf_counter() - started,
                  finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    record["environment"]["threads"] = torch.get_num_threads()
    atomic_write_json(path, record)
    return record


def _write_status(path: Path, text: str) -> None:
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------
# the phases


def train(job: Job, root: Path, report: Report) -> dict:
    """Train (or resume) the job's run; returns where the handed-on model came from."""
    from ..config import config_from_dict
    from ..training import Trainer

    run_dir = job.run_dir(root)
    config = config_from_dict(job.config)

    def progress(iterable, total, description):
        report(f"{job.label}: train {description}")
        return iterable

    trainer = Trainer(config, run_dir, progress=progress, dataset=dataset_of(config.data))
    results = trainer.fit(resume=(run_dir / "checkpoint.pt").exists())
    return {"model": results["model"], "device": str(trainer.device)}


def certify(job: Job, root: Path, report: Report) -> dict:
    """Certify the trained model on the first ``count`` test samples (resuming the verdicts)."""
    from ..certify import certify as run_cascade
    from ..training import resolve_device

    model, config = _trained(job, root)
    test = dataset_of(config.data).test
    count = len(test) if job.certify.count is None else min(job.certify.count, len(test))
    device = resolve_device(config.device)
    result = run_cascade(model, test, config.eps.test_eps, indices=range(count), out_dir=job.certify_dir(root),
                         settings=job.certify.settings(), device=device, resume=True,
                         data_name=f"{config.data.dataset}/test",
                         progress=lambda done, total: report(f"{job.label}: certify {done}/{total}"))
    return {"samples": result.summary["samples"], "device": str(device)}


def analyze(job: Job, root: Path, spec: AnalysisSpec, report: Report) -> dict:
    """One chosen analysis of the trained model on the first ``spec.count`` test samples."""
    report(f"{job.label}: {spec.name}")
    model, config = _trained(job, root)
    test = dataset_of(config.data).test.head(spec.count)
    analysis = ANALYSES[spec.name]
    if analysis.certified_only:
        indices = _certified_indices(job, root, len(test))
        progress = analysis_record_path(job, root, spec).with_suffix(".progress.json")
        return analysis.run(model, test.images[indices], test.labels[indices], config.eps.test_eps, spec.options,
                            indices=indices, progress_path=progress)
    return analysis.run(model, test.images, test.labels, config.eps.test_eps, spec.options)


def _certified_indices(job: Job, root: Path, count: int) -> list[int]:
    """The test indices below ``count`` that the job's certification certified."""
    from ..certify.cascade import VERDICTS_FILE, read_verdicts

    verdicts = read_verdicts(job.certify_dir(root) / VERDICTS_FILE)
    return sorted(v.index for v in verdicts if v.verdict == "certified" and v.index < count)


def _trained(job: Job, root: Path):
    from ..cli import load_trained

    return load_trained(str(job.run_dir(root)))


@functools.lru_cache(maxsize=4)
def _cached_dataset(name: str, data_dir: str | None, download: bool):
    from ..data import load_dataset

    return load_dataset(name, data_dir, download)


@functools.lru_cache(maxsize=4)
def _cached_files(data_config):
    from ..data import load_data

    return load_data(data_config)


def dataset_of(data_config):
    """The data set of a config's data section, loaded once per process."""
    if data_config.dataset == FILES_DATASET:  # your own files: the whole data section says what to read
        return _cached_files(data_config)
    return _cached_dataset(data_config.dataset, data_config.data_dir, data_config.download)

