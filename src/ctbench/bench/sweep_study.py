"""Running a sweep on Optuna: one study per sweep, in an RDB storage that its workers share.

Storage: the SQLite file ``<db stem>-sweeps.sqlite`` beside the results database (``--db``;
default ``runs/bench/ctbench-sweeps.sqlite``), opened as ``sqlite:///`` in WAL mode with a
120 s busy timeout. It is a sibling, not the results database itself, because the two have
different writers: the results database is written by one coordinating process in long
``BEGIN IMMEDIATE`` ingests, while every sweep worker writes its own trials through SQLAlchemy
(short deferred transactions, Optuna's schema and migrations); in one file a long ingest would
hold the write lock that a worker's trial update waits on (and may give up on).

Trials: Optuna's ``GridSampler`` enumerates the grid (seed 0, so every worker sees one order);
each trial trains its grid point once per seed (``Sweep.run_dir``) with the Trainer's final
test evaluation turned off, and returns two objective values, both maximized and averaged over
the seeds: the validation certified accuracy (IBP or CROWN-IBP, as the Trainer's selection
measures it; IBP alone for adversarial methods) and the validation natural accuracy of the
model the Trainer hands on (``results.json`` "validation"). The test set is never evaluated.

Resume: a grid point whose run folder has ``results.json`` is read, not trained again; one
with a checkpoint resumes from it. A failed or interrupted trial is retried on the next run
with Optuna's own retry (a waiting copy of the trial with its grid id); a trial whose worker
died is failed by Optuna's heartbeat after ``GRACE_SECONDS`` and then retried. Grid points that
are done are skipped. Two workers that ever draw one grid point take turns on its run folder
(a lock file), so the second reads the first's result.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import sqlite3
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .jobs import TRAIN_RECORD, read_record
from .phases import dataset_of, run_phase
from .runner import available_cores
from .sweep import Sweep, SweepError, point_label

BUSY_TIMEOUT_SECONDS = 120
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300
OBJECTIVES = ("certified", "natural")  # the trial's values, in this order; both maximized


class TrialFailed(RuntimeError):
    """A grid point's training raised; the message names the point, the seed and the record."""


def storage_path(db: Path | str) -> Path:
    """The sweeps' Optuna storage beside the results database ``db``."""
    db = Path(db)
    return db.with_name(f"{db.stem}-sweeps.sqlite")


def open_storage(path: Path):
    """Optuna's RDB storage on the SQLite file ``path`` (WAL, busy timeout, heartbeat)."""
    import optuna

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
    with _stable_enough():
        return optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}",
                                          engine_kwargs={"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS}},
                                          heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


@contextlib.contextmanager
def _stable_enough() -> Iterator[None]:
    """Optuna marks its heartbeat (in Optuna since 2.9) experimental; its warning is no news to a user."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_study(sweep: Sweep, storage, create: bool = True):
    """The sweep's study (created when ``create``); refuses a study made by another definition."""
    import optuna

    sampler = optuna.samplers.GridSampler({key: list(values) for key, values in sweep.grid.items()}, seed=0)
    if not create and sweep.study not in optuna.get_all_study_names(storage):
        raise SweepError(f"no sweep {sweep.study!r} in {storage.url} yet; run the same command without --show first")
    study = optuna.create_study(study_name=sweep.study, storage=storage, sampler=sampler,
                                directions=["maximize"] * len(OBJECTIVES), load_if_exists=True)
    stored = study.user_attrs.get("definition")
    if stored is None:
        study.set_user_attr("definition", sweep.definition())
    elif stored != sweep.definition():
        differing = sorted(key for key in stored if stored[key] != sweep.definition().get(key))
        raise SweepError(f"the study {sweep.study!r} was made by another sweep (it differs in: "
                         f"{', '.join(differing)}); rerun with that study's arguments, or name a new study with "
                         f"--study NAME")
    return study


# ----------------------------------------------------------------------------------------------
# running


@dataclass
class SweepReport:
    """Grid points (labels) done before this run, done now, failed (with why), and running elsewhere."""

    study: str
    storage: Path
    done_before: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    running: list[str] = field(default_factory=list)


def run_sweep(sweep: Sweep, db: Path | str, workers: int = 1, threads: int | None = None,
              progress: bool = False) -> SweepReport:
    """Train the sweep's missing grid points (in ``workers`` processes) and report."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    path = storage_path(db)
    study = open_study(sweep, open_storage(path))
    before = _latest_by_grid(study)
    _retry_failed(study)
    if workers == 1:
        _set_threads(threads)
        work(sweep, str(db), progress)
    else:
        _run_workers(sweep, str(db), workers, max(1, (threads or available_cores()) // workers), progress)
    return _report(sweep, study, before, path)


def work(sweep: Sweep, db: str, progress: bool = False) -> None:
    """One worker: run trials until every grid point has been started and none waits."""
    study = open_study(sweep, open_storage(storage_path(db)))
    root = Path(db).parent
    callbacks = [_print_trial] if progress else []
    while _work_left(study, len(sweep.points())):
        with _stable_enough():
            study.optimize(functools.partial(objective, sweep=sweep, root=root), n_trials=1, catch=(Exception,),
                           callbacks=callbacks)


def _work_left(study, points: int) -> bool:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    started = {t.system_attrs.get("grid_id") for t in trials if t.state != TrialState.WAITING}
    return any(t.state == TrialState.WAITING for t in trials) or len(started - {None}) < points


def _latest_by_grid(study) -> dict[int, Any]:
    """The latest trial of each grid point (by Optuna's grid id)."""
    latest: dict[int, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        grid_id = trial.system_attrs.get("grid_id")
        if grid_id is not None and (grid_id not in latest or trial.number > latest[grid_id].number):
            latest[grid_id] = trial
    return latest


def _retry_failed(study) -> None:
    """A waiting copy (Optuna's retry: same grid id) of each grid point whose latest trial
    failed; first fails the trials of dead workers (heartbeat)."""
    import optuna
    from optuna.trial import TrialState

    with _stable_enough():
        optuna.storages.fail_stale_trials(study)
    for trial in _latest_by_grid(study).values():
        if trial.state in (TrialState.FAIL, TrialState.PRUNED):
            attributes = {"grid_id": trial.system_attrs["grid_id"], "search_space": trial.system_attrs["search_space"],
                          "retry_of": trial.number}
            study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                                      distributions=trial.distributions, system_attrs=attributes))


def _report(sweep: Sweep, study, before: dict[int, Any], path: Path) -> SweepReport:
    from optuna.trial import TrialState

    report = SweepReport(sweep.study, path)
    done_before = {grid_id for grid_id, trial in before.items() if trial.state == TrialState.COMPLETE}
    for grid_id, trial in sorted(_latest_by_grid(study).items()):
        label = point_label(trial.params) if trial.params else f"grid point {grid_id}"
        if trial.state == TrialState.COMPLETE:
            (report.done_before if grid_id in done_before else report.done).append(label)
        elif trial.state == TrialState.RUNNING:
            report.running.append(label)
        else:
            report.failed.append((label, trial.user_attrs.get("error", f"trial {trial.number} {trial.state.name}")))
    return report


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _worker(sweep: Sweep, db: str, threads: int, progress: bool) -> None:
    """A worker process: ``threads`` torch threads; exit code 130 when interrupted."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _set_threads(threads)
    try:
        work(sweep, db, progress)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_workers(sweep: Sweep, db: str, workers: int, threads: int, progress: bool) -> None:
    """``workers`` spawned processes on one study; on an interrupt each records its trial as failed."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    processes = [context.Process(target=_worker, args=(sweep, db, threads, progress), name=f"sweep worker {k}")
                 for k in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()


def _print_trial(study, trial) -> None:
    values = "" if trial.values is None else ", ".join(
        f"{name} {100 * value:.2f}%" for name, value in zip(OBJECTIVES, trial.values))
    print(f"sweep {study.study_name}: trial {trial.number} {point_label(trial.params)}: {trial.state.name.lower()}"
          f"{' (validation ' + values + ')' if values else ''}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# a trial


def objective(trial, sweep: Sweep, root: Path) -> tuple[float, float]:
    """Train the trial's grid point once per seed; (certified, natural) validation accuracy,
    averaged over the seeds. A failure is kept as the trial's "error" attribute."""
    params = {key: trial.suggest_categorical(key, list(values)) for key, values in sweep.grid.items()}
    try:
        records = [train_point(sweep, root, params, seed) for seed in sweep.seeds]
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
        raise
    trial.set_user_attr("validation", records)
    return tuple(statistics.fmean(record[name] for record in records) for name in OBJECTIVES)


def train_point(sweep: Sweep, root: Path, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The validation record of one grid point and seed, training (or resuming) it when its run
    folder has no results yet."""
    run_dir = sweep.run_dir(root, params, seed)
    with _exclusive(run_dir):
        if read_record(run_dir / "results.json") is None:
            record = run_phase(run_dir / TRAIN_RECORD, functools.partial(_train, sweep.config(params, seed), run_dir))
            if record["status"] == "error":
                raise TrialFailed(f"{point_label(params)} seed {seed}: {record['error']} "
                                  f"(traceback in {run_dir / TRAIN_RECORD})")
        results = read_record(run_dir / "results.json")
    return {"seed": seed, "run_dir": str(run_dir.resolve()), **validation_objectives(results["validation"])}


def _train(config, run_dir: Path) -> dict:
    from ..training import Trainer

    trainer = Trainer(config, run_dir, dataset=dataset_of(config.data), final_test=False)
    results = trainer.fit(resume=(run_dir / "checkpoint.pt").exists())
    return {"model": results["model"], "device": str(trainer.device)}


def validation_objectives(validation: dict[str, Any]) -> dict[str, Any]:
    """The objective values of a Trainer validation record: certified (CROWN-IBP or IBP where
    the record has it, else IBP alone) and natural accuracy, and the samples they count."""
    tighter = validation.get("crown_ibp_certified_accuracy")
    return {"certified": validation["certified_accuracy"] if tighter is None else tighter,
            "certified_by": "ibp" if tighter is None else "ibp+crown-ibp",
            "natural": validation["natural_accuracy"], "samples": validation["samples"]}


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock file (POSIX); elsewhere, no lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: workers rarely share a point, and then one redoes it
        yield
        return
    with open(run_dir / ".sweep.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
