"""The certification cascade: per-sample verdicts, written as they are decided, resumable and
shardable.

``certify`` takes the samples in batches. In each batch the clean float32 forward pass of the
model marks the misclassified samples "wrong"; the stages (``stages.STAGES``, in the given order,
default IBP -> CROWN-IBP -> attack -> alpha-CROWN -> branch and bound) then run on the samples
still open, each deciding some (certified, or falsified with a confirmed counterexample);
what is left at the end is "unknown".

Files in ``out_dir``:

* ``verdicts.jsonl`` (or ``verdicts-shard-k-of-N.jsonl``): one JSON record per sample
  (``Verdict.to_json``: ``index``, ``verdict``, ``stage``, ``seconds``, ``margin_lower``, ...),
  appended, flushed and fsynced as soon as it is final: after each batched stage for the samples
  it decided, after each sample in the per-sample stages (bab, milp). Records are therefore not
  in index order; readers sort them. On a restart the samples already in the
  file are skipped; a partial last line (a crash in the middle of a write) is cut off first,
  while a malformed line elsewhere is an error.
* ``summary.json`` (``summary-shard-k-of-N.json`` for a shard): ``summarize`` of the file.
* ``counterexamples/<index>.npy``: counterexamples with more than
  ``inline_counterexample_limit`` elements (smaller ones are inline in the record).

Sharding: ``Shard(k, N)`` keeps the selected indices i with i % N == k (strided, so every shard
gets a similar mix of easy and hard samples); shards can run on different machines into the same
folder (each writes its own file), and ``merge`` combines them: an index present in two files
with different verdicts raises ``VerdictConflict``; identical duplicates are kept once.

Time: ``seconds`` of a record is the sample's share of the batched stages (each stage's wall
time divided equally among the samples it ran on) plus its own time in the per-sample stages
(bab, milp), which get the per-sample ``timeout`` minus what the sample already used.

Summary (``summarize``), as fractions of the samples in the file: natural accuracy (not
wrong), certified accuracy (total and per certifying stage), adversarial accuracy = correct and
not falsified (certified and unknown samples count as robust: it is an upper bound of the true
robust accuracy, as with any attack), and the counts of falsified and unknown samples; time
totals per stage.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..io import atomic_write_json, atomic_write_text
from ..models.ops import lower_network
from .provenance import Provenance, ProvenanceMismatch, check_same, data_hash, model_hash, package_version, settings_hash
from .provenance import settings_record
from .soundness import float64_ops
from .stages import CertifySettings, CertifyInputError, OpenSamples, StageContext, build_stage, stage_names
from .verdicts import (
    InvalidVerdict, Verdict, VerdictBook, falsified_verdict, model_device,
)

VERDICTS_FILE = "verdicts.jsonl"
SUMMARY_FILE = "summary.json"
PROVENANCE_FILE = "provenance.json"
_SHARD_FILE = re.compile(r"verdicts-shard-(\d+)-of-(\d+)\.jsonl$")


class SoundnessError(RuntimeError):
    """A certified sample was falsified (cross-check), i.e. a bound or an attack is wrong."""


@dataclass(frozen=True)
class Shard:
    """Shard k of N: the indices i with i % N == k."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if self.n < 1 or not 0 <= self.k < self.n:
            raise ValueError(f"a shard is k/N with 0 <= k < N, got {self.k}/{self.n}")

    @staticmethod
    def parse(text: str) -> "Shard":
        try:
            k, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard takes k/N (e.g. 0/4), got {text!r}") from None
        return Shard(k, n)

    def select(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if i % self.n == self.k]

    @property
    def verdicts_file(self) -> str:
        return f"verdicts-shard-{self.k}-of-{self.n}.jsonl"

    @property
    def summary_file(self) -> str:
        return f"summary-shard-{self.k}-of-{self.n}.json"


@dataclass(frozen=True)
class CertifyResult:
    verdicts: list[Verdict]
    summary: dict
    path: Path | None


# ----------------------------------------------------------------------------------------------
# verdict files


def read_verdicts(path: Path, repair: bool = False) -> list[Verdict]:
    """Records of a verdicts file. Text after the last newline is a partial record (a write cut
    short by a crash): it is ignored and, with ``repair``, cut off the file. A complete line
    that is not a valid record is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    verdicts: list[Verdict] = []
    position, number = 0, 0
    while True:
        newline = data.find(b"\n", position)
        if newline < 0:
            break
        number += 1
        line = data[position:newline]
        if line.strip():
            try:
                verdicts.append(Verdict.from_json(json.loads(line)))
            except (ValueError, TypeError, InvalidVerdict) as error:
                raise InvalidVerdict(f"{path}: line {number} is not a verdict record ({error})") from None
        position = newline + 1
    if repair and position < len(data):
        with open(path, "r+b") as stream:
            stream.truncate(position)
    return verdicts


def append_verdicts(path: Path, verdicts: Sequence[Verdict]) -> None:
    """Append records, one line each, then flush and fsync (a crash loses at most a partial
    last line, which ``read_verdicts`` tolerates)."""
    if not verdicts:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(v.to_json(), sort_keys=True) + "\n" for v in verdicts)
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def write_verdicts(path: Path, verdicts: Sequence[Verdict]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(v.to_json(), sort_keys=True) + "\n" for v in verdicts))


# ----------------------------------------------------------------------------------------------
# summary and merge


def index_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted distinct indices as half-open ranges [[start, stop], ...] (compact for JSON)."""
    ranges: list[list[int]] = []
    for index in sorted(set(int(i) for i in indices)):
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return ranges


def indices_from_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [index for start, stop in ranges for index in range(int(start), int(stop))]


def summarize(verdicts: Sequence[Verdict], requested: Iterable[int] | None = None) -> dict:
    """Natural, certified (total and per stage) and adversarial accuracy, counts and times over
    the ``requested`` indices (default: those of the records). Records outside the request are
    not counted. Requested samples without a record are ``missing``; then the accuracies are
    None (``complete`` False), since a fraction over part of the request is no final figure."""
    by_index = {verdict.index: verdict for verdict in verdicts}
    wanted = sorted(set(by_index) if requested is None else {int(i) for i in requested})
    verdicts = [by_index[i] for i in wanted if i in by_index]
    missing = len(wanted) - len(verdicts)
    total = len(wanted)
    counts = {name: 0 for name in ("certified", "falsified", "wrong", "unknown")}
    certified_by_stage: dict[str, int] = {}
    falsified_by_stage: dict[str, int] = {}
    seconds_by_stage: dict[str, float] = {}
    eps_values = set()
    for verdict in verdicts:
        counts[verdict.verdict] += 1
        if verdict.certified:
            certified_by_stage[verdict.stage] = certified_by_stage.get(verdict.stage, 0) + 1
        if verdict.falsified:
            falsified_by_stage[verdict.stage] = falsified_by_stage.get(verdict.stage, 0) + 1
        for stage, seconds in verdict.times.items():
            seconds_by_stage[stage] = seconds_by_stage.get(stage, 0.0) + seconds
        if verdict.eps is not None:
            eps_values.add(verdict.eps)

    def fraction(count: int) -> float | None:
        return count / total if total and not missing else None

    seconds_total = sum(v.seconds for v in verdicts)
    return {
        "samples": total,
        "decided": len(verdicts),
        "missing": missing,
        "complete": missing == 0,
        "eps": sorted(eps_values)[0] if len(eps_values) == 1 else sorted(eps_values),
        "natural_accuracy": fraction(total - missing - counts["wrong"]),
        "certified_accuracy": fraction(counts["certified"]),
        "certified_accuracy_by_stage": {s: fraction(c) for s, c in sorted(certified_by_stage.items())},
        "adversarial_accuracy": fraction(total - missing - counts["wrong"] - counts["falsified"]),
        "counts": counts,
        "certified_by_stage": dict(sorted(certified_by_stage.items())),
        "falsified_by_stage": dict(sorted(falsified_by_stage.items())),
        "seconds_total": seconds_total,
        "seconds_mean": seconds_total / len(verdicts) if verdicts else None,
        "seconds_by_stage": dict(sorted(seconds_by_stage.items())),
    }


def _requested_selection(out_dir: Path) -> list[int] | None:
    """The samples the certify runs of a folder were asked for (before sharding), from their
    summary files; None when no summary records it. Different selections are refused."""
    selections = {}
    for path in sorted(out_dir.glob("summary*.json")):
        selection = json.loads(path.read_text()).get("selection")
        if selection is not None:
            selections[path.name] = json.dumps(selection)
    if not selections:
        return None
    if len(set(selections.values())) > 1:
        raise ProvenanceMismatch(f"the shards in {out_dir} were asked for different samples "
                                 f"({', '.join(sorted(selections))}): certify every shard with the same "
                                 f"--start/--count, or merge them in separate folders")
    return indices_from_ranges(json.loads(next(iter(selections.values()))))


def merge(out_dir: Path, write: bool = True) -> CertifyResult:
    """Combine ``verdicts.jsonl`` and every ``verdicts-shard-k-of-N.jsonl`` in ``out_dir`` into
    ``verdicts.jsonl`` (sorted by index) and ``summary.json``.

    Refuses (``ProvenanceMismatch``) records of another model, eps, data, settings or version
    than the first file's, and records without provenance; raises ``VerdictConflict`` when an
    index has two different verdicts. The summary covers the samples the shards were asked for
    (their summaries' ``selection``): samples of missing shards or unfinished runs are counted
    as ``missing`` and then no accuracy is reported. It also lists the shards found and missing."""
    out_dir = Path(out_dir)
    book = VerdictBook()
    shards: dict[int, set[int]] = {}
    files = sorted(p for p in out_dir.glob("verdicts-shard-*-of-*.jsonl") if _SHARD_FILE.search(p.name))
    if (out_dir / VERDICTS_FILE).exists():
        files.append(out_dir / VERDICTS_FILE)
    if not files:
        raise FileNotFoundError(f"no verdict files ({VERDICTS_FILE} or verdicts-shard-k-of-N.jsonl) in {out_dir}")
    expected: Provenance | None = None
    first = ""
    for path in files:
        match = _SHARD_FILE.search(path.name)
        if match:
            shards.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
        for verdict in read_verdicts(path):
            if expected is None:
                expected, first = verdict.provenance, path.name
            check_same(expected, verdict.provenance, f"{out_dir / path.name} (against {first})",
                       "merge only shards of one certify command (same model, eps, data, stages and settings)")
            book.add(verdict, source=path.name)
    verdicts = book.sorted()
    requested = _requested_selection(out_dir)
    summary = summarize(verdicts, requested)
    if requested is not None:
        summary["selection"] = index_ranges(requested)
    if shards:
        summary["shards"] = {f"of-{n}": {"found": sorted(ks), "missing": sorted(set(range(n)) - ks)}
                             for n, ks in sorted(shards.items())}
    if write:
        write_verdicts(out_dir / VERDICTS_FILE, verdicts)
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return CertifyResult(verdicts, summary, out_dir / VERDICTS_FILE)


def default_out_dir(run_dir: Path | str, eps: float, test_eps: float) -> Path:
    """``RUN/certify`` at the run's test eps (the folder other modules read verdicts from),
    ``RUN/certify-eps<E>`` at any other eps."""
    if math.isclose(eps, test_eps, rel_tol=1e-9, abs_tol=1e-12):
        return Path(run_dir) / "certify"
    return Path(run_dir) / f"certify-eps{eps:g}"


# ----------------------------------------------------------------------------------------------
# the cascade


def _as_tensors(data) -> tuple[Tensor, Tensor]:
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data.images, data.labels
    images, labels = data
    return images, labels


def _to_float(images: Tensor, device) -> Tensor:
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255.0)
    return images.to(device=device, dtype=torch.float32)


def _finite(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value) and value > 0:
        return sys.float_info.max
    return value if math.isfinite(value) else None


def check_eps(eps) -> float:
    """eps as a float; it must be finite and >= 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise CertifyInputError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise CertifyInputError(f"eps must be finite and >= 0, got {eps!r}: a negative radius gives an empty box "
                                f"(lower > upper), in which every claim is vacuously true")
    return value


def check_inputs(images: Tensor, labels: Tensor, data_range: tuple[float, float]) -> None:
    """Images finite and inside the data range (uint8 images are, once divided by 255); labels
    integers, one per image."""
    if images.shape[0] != labels.shape[0]:
        raise CertifyInputError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise CertifyInputError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if images.dtype == torch.uint8 or images.numel() == 0:
        return
    if not images.dtype.is_floating_point:
        raise CertifyInputError(f"images must be uint8 (0-255) or floating point, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise CertifyInputError("images contain NaN or infinite values")
    lo, hi = data_range
    low, high = float(images.min()), float(images.max())
    if low < lo or high > hi:
        raise CertifyInputError(f"images must lie in the data range [{lo:g}, {hi:g}], found values in "
                                f"[{low:g}, {high:g}]: the box around such an input is clamped to the range "
                                f"and may be empty; scale the images to [{lo:g}, {hi:g}] (pass uint8 images to "
                                f"have them divided by 255)")


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CertifyInputError(f"labels must lie in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
                                f"found [{int(labels.min())}, {int(labels.max())}]")


def _check_indices(indices: list[int], count: int) -> None:
    if len(set(indices)) != len(indices):
        raise CertifyInputError("the sample indices contain duplicates")
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise CertifyInputError(f"sample indices {bad[:5]} are outside the data (0..{count - 1})")


def _write_provenance(out_dir: Path, provenance: Provenance, settings: CertifySettings, resume: bool) -> None:
    """``provenance.json``: the provenance and the full settings behind its hash. A folder that
    holds another certification is refused on resume (``--restart`` replaces it)."""
    path = out_dir / PROVENANCE_FILE
    if resume and path.exists():
        known = Provenance.from_json(json.loads(path.read_text())["provenance"])
        check_same(provenance, known, f"{out_dir} (its {PROVENANCE_FILE})",
                   "rerun with --restart to certify anew, or choose another --out folder")
        return
    atomic_write_json(path, {"provenance": provenance.to_json(), "settings": settings_record(settings)})


def certify(model: nn.Module, data, eps: float, stages: str | Sequence[str] | None = None,
            timeout: float | None = None, indices: Iterable[int] | None = None, out_dir: Path | str | None = None,
            *, shard: Shard | str | None = None, settings: CertifySettings | None = None,
            device: torch.device | str | None = None, resume: bool = True, data_name: str = "data/test",
            progress: Callable[[int, int], None] | None = None) -> CertifyResult:
    """Certify ``data`` (a ``Split`` with uint8 images, or an (images, labels) pair; uint8
    images are divided by 255, float images must lie in the data range) at radius ``eps``
    (finite, >= 0) (module docstring).

    stages / timeout override ``settings``; indices: which samples (default all); shard:
    ``Shard`` or "k/N" (applied to the indices); out_dir: where the verdicts go (None: nothing is
    written); resume: skip the indices already in the file, after checking that every record
    there has this certification's provenance (else ``ProvenanceMismatch``); without resume the
    file is started anew; data_name: "<dataset>/<split>", recorded in the provenance; progress(done,
    total) is called after every batch. The model is moved to ``device`` and put in eval mode.
    Returns the records of the requested samples and their summary."""
    settings = settings or CertifySettings()
    if stages is not None:
        settings = replace(settings, stages=stage_names(stages))
    if timeout is not None:
        settings = replace(settings, timeout=float(timeout))
    eps = check_eps(eps)
    stage_list = [build_stage(name) for name in stage_names(settings.stages)]
    _check_network(model, stage_list)
    images, labels = _as_tensors(data)
    check_inputs(images, labels, settings.data_range)
    indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    _check_indices(indices, len(labels))
    selection = index_ranges(indices)
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    if shard is not None:
        indices = shard.select(indices)
    provenance = Provenance(model_hash(model), eps, f"{data_name}@{data_hash(images, labels)}",
                            settings_hash(settings), package_version())

    out_path = None
    book = VerdictBook()
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / (shard.verdicts_file if shard is not None else VERDICTS_FILE)
        _write_provenance(out_dir, provenance, settings, resume)
        if resume:
            for verdict in read_verdicts(out_path, repair=True):
                check_same(provenance, verdict.provenance, str(out_path),
                           "rerun with --restart to certify anew, or choose another --out folder")
                book.add(verdict, source=out_path.name)
        elif out_path.exists():
            out_path.unlink()
    pending = [i for i in indices if i not in book]

    device = torch.device(device) if device is not None else model_device(model)
    model = model.to(device).eval()
    num_classes = int(_num_classes(model, images, device))
    _check_labels(labels, num_classes)
    ctx = StageContext(model, lower_network(model, detach=True), float64_ops(model), eps, num_classes, settings)
    done = len(indices) - len(pending)

    def sink(verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            book.add(verdict)
        if out_path is not None:
            append_verdicts(out_path, verdicts)

    for start in range(0, len(pending), settings.batch_size):
        batch = pending[start:start + settings.batch_size]
        _certify_batch(ctx, stage_list, batch, images, labels, device, out_dir, sink, provenance)
        done += len(batch)
        if progress is not None:
            progress(done, len(indices))
    selected = set(indices)
    result_verdicts = [v for v in book.sorted() if v.index in selected]
    summary = summarize(result_verdicts, indices)
    summary["selection"] = selection
    summary["shard"] = f"{shard.k}/{shard.n}" if shard is not None else None
    summary["provenance"] = provenance.to_json()
    if out_dir is not None:
        atomic_write_json(out_dir / (shard.summary_file if shard is not None else SUMMARY_FILE), summary)
    return CertifyResult(result_verdicts, summary, out_path)


def _check_network(model: nn.Module, stage_list) -> None:
    """Every stage must handle the lowered model (``Stage.check_network``), else the error
    names the stages that do not, why, and the stages to keep."""
    network = lower_network(model, detach=True)
    refused: dict[str, str] = {}
    for stage in stage_list:
        try:
            stage.check_network(network)
        except TypeError as error:
            refused[stage.name] = str(error)
    if refused:
        usable = ",".join(s.name for s in stage_list if s.name not in refused) or "ibp,crown-ibp,attack,alpha-crown"
        reason = next(iter(refused.values()))
        raise CertifyInputError(f"the stages {', '.join(refused)} cannot certify this model ({reason}); "
                                f"leave them out of --stages, e.g. --stages {usable}")


def _num_classes(model: nn.Module, images: Tensor, device) -> int:
    with torch.no_grad():
        return model(_to_float(images[:1], device)).shape[1]


def _certify_batch(ctx: StageContext, stage_list, batch: list[int], images: Tensor, labels: Tensor, device,
                   out_dir: Path | None, sink: Callable[[list[Verdict]], None],
                   provenance: Provenance | None = None) -> list[Verdict]:
    """Run the cascade on one batch. Every verdict goes to ``sink`` as soon as it is final: the
    wrong ones after the clean pass, the ones a batched stage decides after that stage, and, in a
    per-sample stage (bab, milp), each sample right after its own run. With ``cross_check``,
    certified verdicts are attacked first and reach ``sink`` only when no attack breaks them."""
    settings = ctx.settings
    index_tensor = torch.tensor(batch, dtype=torch.long)
    x = _to_float(images[index_tensor], device)
    y = labels[index_tensor].to(device)
    count = len(batch)
    times: list[dict[str, float]] = [dict() for _ in range(count)]
    begin = time.monotonic()
    with torch.no_grad():
        logits = ctx.model(x).float()
    predicted = logits.argmax(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    clean_margin = (logits.gather(1, y[:, None]).squeeze(1) - others.amax(1)).tolist()
    share = (time.monotonic() - begin) / count
    for t in times:
        t["clean"] = share
    final: dict[int, Verdict] = {}
    best_margin = [-math.inf] * count
    details: dict[int, str] = {}

    def finish(rows_and_verdicts: list[tuple[int, Verdict]]) -> None:
        certified_rows = [row for row, verdict in rows_and_verdicts if verdict.certified]
        if settings.cross_check and certified_rows:
            _cross_check(ctx, batch, x, y, certified_rows)
        done = []
        for row, verdict in rows_and_verdicts:
            final[row] = replace(verdict, seconds=float(sum(times[row].values())), times=dict(times[row]),
                                 provenance=provenance)
            done.append(final[row])
        if done:
            sink(done)

    def unknown(row: int, stage_name: str) -> Verdict:
        return Verdict(index=batch[row], verdict="unknown", stage=stage_name, label=int(y[row]),
                       predicted=int(predicted[row]), eps=ctx.eps, margin_lower=_finite(best_margin[row]),
                       detail=details.get(row))

    def decide(stage_name: str, rows: list[int], outcome, elapsed: float) -> list[tuple[int, Verdict]]:
        """Book a stage's outcome for ``rows``; returns the decided (row, verdict) pairs."""
        for local, row in enumerate(rows):
            seconds = outcome.seconds[local] if outcome.seconds is not None else elapsed / len(rows)
            times[row][stage_name] = times[row].get(stage_name, 0.0) + seconds
            if outcome.margins is not None:
                value = float(outcome.margins[local])
                if not math.isnan(value):
                    best_margin[row] = max(best_margin[row], value)
            if local in outcome.details:
                details[row] = outcome.details[local]
        decided = []
        for decision in outcome.decisions:
            row = rows[decision.position]
            decided.append((row, _decision_verdict(ctx, stage_name, decision, batch[row], x[row], int(y[row]),
                                                   int(predicted[row]), out_dir)))
        return decided

    open_rows = []
    wrong = []
    for row, index in enumerate(batch):
        if int(predicted[row]) != int(y[row]):
            wrong.append((row, Verdict(index=index, verdict="wrong", stage="clean", label=int(y[row]),
                                       predicted=int(predicted[row]), eps=ctx.eps, margin_upper=clean_margin[row])))
        else:
            open_rows.append(row)
    finish(wrong)
    last_stage = "clean"
    for number, stage in enumerate(stage_list):
        if not open_rows:
            break
        last_stage = stage.name
        is_last = number == len(stage_list) - 1
        groups = [[row] for row in open_rows] if getattr(stage, "per_sample", False) else [open_rows]
        still_open = []
        for rows in groups:
            selected = torch.tensor(rows, device=device)
            budgets = [settings.timeout - sum(times[r].values()) for r in rows]
            samples = OpenSamples([batch[r] for r in rows], x[selected], y[selected], budgets)
            begin = time.monotonic()
            outcome = stage.run(ctx, samples)
            decided = decide(stage.name, rows, outcome, time.monotonic() - begin)
            decided_rows = {row for row, _ in decided}
            left = [row for row in rows if row not in decided_rows]
            if is_last:
                decided += [(row, unknown(row, stage.name)) for row in left]
                left = []
            finish(decided)
            still_open += left
        open_rows = still_open
    finish([(row, unknown(row, last_stage)) for row in open_rows])
    return [final[row] for row in sorted(final, key=lambda r: batch[r])]


def _decision_verdict(ctx: StageContext, stage_name: str, decision, index: int, x: Tensor, label: int,
                      predicted: int, out_dir: Path | None) -> Verdict:
    settings = ctx.settings
    if decision.verdict == "certified":
        return Verdict(index=index, verdict="certified", stage=stage_name, label=label, predicted=predicted,
                       eps=ctx.eps, margin_lower=_finite(decision.margin_lower), detail=decision.detail)
    if decision.verdict == "falsified":
        point = decision.counterexample.detach().to(torch.float32)
        path = None
        if out_dir is not None and point.numel() > settings.inline_counterexample_limit:
            relative = Path("counterexamples") / f"{index}.npy"
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            np.save(out_dir / relative, point.cpu().numpy())
            path = str(relative)
        return falsified_verdict(ctx.model, index, x, label, ctx.eps, point, stage_name, settings.data_range,
                                 counterexample_path=path, detail=decision.detail)
    raise InvalidVerdict(f"stage {stage_name} returned the verdict {decision.verdict!r}")


def _cross_check(ctx: StageContext, batch: list[int], x: Tensor, y: Tensor, rows: list[int]) -> None:
    """Attack the samples of ``rows`` (about to be recorded certified); a confirmed
    counterexample means a bound is unsound: ``SoundnessError``, and nothing is recorded."""
    selected = torch.tensor(rows, device=x.device)
    samples = OpenSamples([batch[r] for r in rows], x[selected], y[selected], [math.inf] * len(rows))
    outcome = build_stage("attack").run(ctx, samples)
    if outcome.decisions:
        bad = [samples.indices[d.position] for d in outcome.decisions]
        raise SoundnessError(f"samples {bad} were certified and then falsified by an attack: a bound is "
                             f"unsound; their verdicts were not recorded")
