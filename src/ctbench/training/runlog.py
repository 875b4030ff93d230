"""What a run folder logs besides its checkpoints, every file written atomically:

* ``metrics.jsonl``: one JSON object per epoch (epochs counted from 1): lr, eps, the mean
  training metrics (``train``), the validation result, seconds, whether the epoch was selected;
* ``metrics.csv``: the same table flattened, one column per metric (``train/natural_loss``,
  ``validation/certified_accuracy``, ...), rewritten from metrics.jsonl after every epoch;
* ``tensorboard/``: the numeric columns as TensorBoard scalars, step = epoch, when the
  ``tensorboard`` package is installed (the ``watch`` extra); without it nothing is written;
* ``environment.json``: one entry per session (the start of a run and each resume): ctbench,
  torch and Python versions, git commit, device, threads, data-parallel ranks, start and end
  times (UTC), where the weights came from and the config keys a resume changed.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path
from typing import Any

from ..environment import environment
from ..io import atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
ENVIRONMENT_FILE = "environment.json"


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"natural_loss": x}} -> {"train/natural_loss": x}; a None section stays out."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records of metrics.jsonl (none when the file is missing)."""
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv holding ``records``."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in records))
    atomic_write_text(run_dir / CSV_FILE, metrics_csv(records))


def metrics_csv(records: list[dict[str, Any]]) -> str:
    """The flattened records as CSV, the columns in order of first appearance (empty: no epoch yet)."""
    if not records:
        return ""
    rows = [flatten(record) for record in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    write_metrics(run_dir, read_metrics(run_dir) + [record])


def keep_metrics_until(run_dir: Path, epochs_done: int) -> None:
    """Drop the records of epochs after ``epochs_done`` (a run killed between the checkpoint
    and the log)."""
    write_metrics(run_dir, [record for record in read_metrics(run_dir) if record["epoch"] <= epochs_done])


class TensorBoardLog:
    """The numeric metrics of every epoch as TensorBoard scalars under ``tensorboard/``, or
    nothing when the tensorboard package is missing. ``first_epoch`` (counted from 1): events of
    that epoch and later, left by a run stopped before its checkpoint, are discarded."""

    def __init__(self, run_dir: Path, first_epoch: int) -> None:
        self.writer = _summary_writer(Path(run_dir) / TENSORBOARD_DIR, first_epoch)

    def add(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in flatten(record).items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, float(value), record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer(folder: Path, first_epoch: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=first_epoch)


def now() -> str:
    """The time in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def start_session(run_dir: Path, details: dict[str, Any]) -> None:
    """Add this session to environment.json: the environment, its start time and ``details``
    (device, ranks, first epoch, ...)."""
    sessions = read_sessions(run_dir)
    sessions.append({**environment(), **details, "started": now(), "finished": None})
    atomic_write_json(Path(run_dir) / ENVIRONMENT_FILE, {"sessions": sessions})


def finish_session(run_dir: Path) -> None:
    """Record the end time of the current session."""
    sessions = read_sessions(run_dir)
    if sessions:
        sessions[-1]["finished"] = now()
        atomic_write_json(Path(run_dir) / ENVIRONMENT_FILE, {"sessions": sessions})


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / ENVIRONMENT_FILE
    return json.loads(path.read_text())["sessions"] if path.exists() else []


VALIDATION_COLUMNS = (("natural_accuracy", "natural"), ("certified_accuracy", "certified"),
                      ("crown_ibp_certified_accuracy", "IBP/CROWN-IBP-certified"),
                      ("adversarial_accuracy", "adversarial"))


def describe_epoch(record: dict[str, Any], epochs: int) -> str:
    """One line for a person: "epoch 3/14  eps 0.0625  lr 0.0005  loss natural 0.3100 robust
    0.7130  validation natural 95.20% certified 80.10%  14.4 s  (selected)"."""
    train = record.get("train", {})
    parts = [f"epoch {record['epoch']}/{epochs}", f"eps {record['eps']:.4g}", f"lr {record['lr']:.3g}"]
    losses = [f"{name.removesuffix('_loss')} {train[name]:.4f}" for name in ("natural_loss", "robust_loss")
              if name in train]
    if losses:
        parts.append("loss " + " ".join(losses))
    validation = record.get("validation")
    if validation:
        parts.append("validation " + " ".join(f"{label} {100 * validation[key]:.2f}%"
                                              for key, label in VALIDATION_COLUMNS if validation.get(key) is not None))
    parts.append(f"{record.get('train_seconds', 0.0) + record.get('validation_seconds', 0.0):.1f} s")
    if record.get("selected"):
        parts.append("(selected)")
    return "  ".join(parts)


def plot_run(run_dir: Path, out: Path) -> Path:
    """The training curves of a run (eps and lr, training losses, validation accuracies per
    epoch) as a PNG at ``out``; needs matplotlib (the ``analysis`` extra)."""
    from ..bench.report_figures import training_curves
    from ..io import atomic_write_bytes

    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{Path(run_dir) / METRICS_FILE} has no epochs to plot: give the folder of a run "
                                "that has finished at least one epoch")
    buffer = io.BytesIO()
    training_curves(str(run_dir), records).savefig(buffer, format="png")
    atomic_write_bytes(out, buffer.getvalue())
    return Path(out)
