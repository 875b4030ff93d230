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
from .soundness import float64_ops
from .stages import CertifySettings, OpenSamples, StageContext, build_stage, stage_names
from .verdicts import (
    InvalidVerdict, Verdict, VerdictBook, falsified_verdict, model_device,
)

VERDICTS_FILE = "verdicts.jsonl"
SUMMARY_FILE = "summary.json"
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


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """Natural, certified (total and per stage) and adversarial accuracy, counts and times."""
    total = len(verdicts)
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
        return count / total if total else None

    seconds_total = sum(v.seconds for v in verdicts)
    return {
        "samples": total,
        "eps": sorted(eps_values)[0] if len(eps_values) == 1 else sorted(eps_values),
        "natural_accuracy": fraction(total - counts["wrong"]),
        "certified_accuracy": fraction(counts["certified"]),
        "certified_accuracy_by_stage": {s: fraction(c) for s, c in sorted(certified_by_stage.items())},
        "adversarial_accuracy": fraction(total - counts["wrong"] - counts["falsified"]),
        "counts": counts,
        "certified_by_stage": dict(sorted(certified_by_stage.items())),
        "falsified_by_stage": dict(sorted(falsified_by_stage.items())),
        "seconds_total": seconds_total,
        "seconds_mean": seconds_total / total if total else None,
        "seconds_by_stage": dict(sorted(seconds_by_stage.items())),
    }


def merge(out_dir: Path, write: bool = True) -> CertifyResult:
    """Combine ``verdicts.jsonl`` and every ``verdicts-shard-k-of-N.jsonl`` in ``out_dir`` into
    ``verdicts.jsonl`` (sorted by index) and ``summary.json``. Raises ``VerdictConflict`` when an
    index has two different verdicts. The summary lists the shards found and the missing ones."""
    out_dir = Path(out_dir)
    book = VerdictBook()
    shards: dict[int, set[int]] = {}
    files = sorted(p for p in out_dir.glob("verdicts-shard-*-of-*.jsonl") if _SHARD_FILE.search(p.name))
    if (out_dir / VERDICTS_FILE).exists():
        files.append(out_dir / VERDICTS_FILE)
    if not files:
        raise FileNotFoundError(f"no verdict files ({VERDICTS_FILE} or verdicts-shard-k-of-N.jsonl) in {out_dir}")
    for path in files:
        match = _SHARD_FILE.search(path.name)
        if match:
            shards.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
        for verdict in read_verdicts(path):
            book.add(verdict, source=path.name)
    verdicts = book.sorted()
    summary = summarize(verdicts)
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


def certify(model: nn.Module, data, eps: float, stages: str | Sequence[str] | None = None,
            timeout: float | None = None, indices: Iterable[int] | None = None, out_dir: Path | str | None = None,
            *, shard: Shard | str | None = None, settings: CertifySettings | None = None,
            device: torch.device | str | None = None, resume: bool = True,
            progress: Callable[[int, int], None] | None = None) -> CertifyResult:
    """Certify ``data`` (a ``Split`` with uint8 images, or an (images, labels) pair; uint8
    images are divided by 255) at radius ``eps`` (module docstring).

    stages / timeout override ``settings``; indices: which samples (default all); shard:
    ``Shard`` or "k/N" (applied to the indices); out_dir: where the verdicts go (None: nothing is
    written); resume: skip the indices already in the file (else the file is started anew);
    progress(done, total) is called after every batch. The model is moved to ``device`` and put in
    eval mode. Returns every record of this run's file and its summary."""
    settings = settings or CertifySettings()
    if stages is not None:
        settings = replace(settings, stages=stage_names(stages))
    if timeout is not None:
        settings = replace(settings, timeout=float(timeout))
    stage_list = [build_stage(name) for name in stage_names(settings.stages)]
    images, labels = _as_tensors(data)
    indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    if shard is not None:
        indices = shard.select(indices)

    out_path = None
    book = VerdictBook()
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / (shard.verdicts_file if shard is not None else VERDICTS_FILE)
        if resume:
            for verdict in read_verdicts(out_path, repair=True):
                if verdict.eps is not None and not math.isclose(verdict.eps, eps, rel_tol=1e-12, abs_tol=0.0):
                    raise InvalidVerdict(f"{out_path} holds verdicts at eps {verdict.eps}, not {eps}: "
                                         f"use another --out folder")
                book.add(verdict, source=out_path.name)
        elif out_path.exists():
            out_path.unlink()
    pending = [i for i in indices if i not in book]

    device = torch.device(device) if device is not None else model_device(model)
    model = model.to(device).eval()
    ctx = StageContext(model, lower_network(model, detach=True), float64_ops(model), float(eps),
                       int(_num_classes(model, images, device)), settings)
    done = len(indices) - len(pending)

    def sink(verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            book.add(verdict)
        if out_path is not None:
            append_verdicts(out_path, verdicts)

    for start in range(0, len(pending), settings.batch_size):
        batch = pending[start:start + settings.batch_size]
        _certify_batch(ctx, stage_list, batch, images, labels, device, out_dir, sink)
        done += len(batch)
        if progress is not None:
            progress(done, len(indices))
    selected = set(indices)
    result_verdicts = [v for v in book.sorted() if v.index in selected] if out_path is None else book.sorted()
    summary = summarize(result_verdicts)
    if out_dir is not None:
        atomic_write_json(out_dir / (shard.summary_file if shard is not None else SUMMARY_FILE), summary)
    return CertifyResult(result_verdicts, summary, out_path)


def _num_classes(model: nn.Module, images: Tensor, device) -> int:
    with torch.no_grad():
        return model(_to_float(images[:1], device)).shape[1]


def _certify_batch(ctx: StageContext, stage_list, batch: list[int], images: Tensor, labels: Tensor, device,
                   out_dir: Path | None, sink: Callable[[list[Verdict]], None]) -> list[Verdict]:
    """Run the cascade on one batch. Every verdict goes to ``sink`` as soon as it is final: the
    wrong ones after the clean pass, the ones a batched stage decides after that stage, and, in a
    per-sample stage (bab, milp), each sample right after its own run."""
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
        done = []
        for row, verdict in rows_and_verdicts:
            final[row] = replace(verdict, seconds=float(sum(times[row].values())), times=dict(times[row]))
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
    if settings.cross_check:
        _cross_check(ctx, batch, x, y, final)
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


def _cross_check(ctx: StageContext, batch: list[int], x: Tensor, y: Tensor, verdicts: dict[int, Verdict]) -> None:
    """Attack every certified sample; a confirmed counterexample means a bound is unsound."""
    rows = [row for row, verdict in verdicts.items() if verdict.certified]
    if not rows:
        return
    selected = torch.tensor(rows, device=x.device)
    samples = OpenSamples([batch[r] for r in rows], x[selected], y[selected], [math.inf] * len(rows))
    outcome = build_stage("attack").run(ctx, samples)
    if outcome.decisions:
        bad = [samples.indices[d.position] for d in outcome.decisions]
        raise SoundnessError(f"samples {bad} were certified and then falsified by an attack")
