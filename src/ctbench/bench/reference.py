"""Published figures to print beside a suite's own: ``reference.yaml`` (its header documents the
record format and where each source was transcribed from).

``load_reference()`` returns the sources and the records, checked: every record names a known
source and only known keys, so a figure is never shown without its source.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REFERENCE_FILE = Path(__file__).parent / "reference.yaml"
# certified: by the whole cascade (or the source's verifier); ibp_certified: by IBP bounds alone, the
# like-for-like figure for sources that certified with IBP only
FIGURE_METRICS = ("natural", "certified", "adversarial", "ibp_certified")
TIME_METRICS = ("train_seconds", "certify_seconds", "seconds_per_epoch")
RECORD_KEYS = ("setting", "method", "source", "cite", "note", "verifier")


@dataclass(frozen=True)
class Value:
    """A figure: ``mean`` (with ``std`` and ``n`` when over seeds), or ``text`` shown as is."""

    mean: float | None = None
    std: float | None = None
    n: int = 1
    text: str | None = None


@dataclass(frozen=True)
class Source:
    key: str
    label: str
    description: str


@dataclass(frozen=True)
class Record:
    setting: str
    method: str
    source: str
    values: dict[str, Value]
    cite: str | None = None
    note: str | None = None
    verifier: str | None = None


@dataclass(frozen=True)
class Reference:
    sources: dict[str, Source]
    figures: tuple[Record, ...]
    times: tuple[Record, ...]


def summary_value(values: list[float]) -> Value:
    """Mean and sample standard deviation (n - 1 in the denominator) of per-seed values."""
    if not values:
        return Value()
    std = statistics.stdev(values) if len(values) > 1 else None
    return Value(statistics.fmean(values), std, len(values))


def parse_value(raw: Any, where: str) -> Value:
    if isinstance(raw, bool) or raw is None:
        raise ValueError(f"{where}: expected a number, a string, {{mean, std, n}} or a list, got {raw!r}")
    if isinstance(raw, (int, float)):
        return Value(float(raw))
    if isinstance(raw, str):
        return Value(text=raw)
    if isinstance(raw, list):
        return summary_value([float(item) for item in raw])
    if isinstance(raw, dict) and set(raw) <= {"mean", "std", "n"} and "mean" in raw:
        return Value(float(raw["mean"]), raw.get("std"), int(raw.get("n", 1)))
    raise ValueError(f"{where}: expected a number, a string, {{mean, std, n}} or a list, got {raw!r}")


def _record(raw: dict, metrics: tuple[str, ...], sources: dict[str, Source], where: str) -> Record:
    unknown = set(raw) - set(RECORD_KEYS) - set(metrics)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {', '.join(RECORD_KEYS + metrics)}")
    if raw.get("source") not in sources:
        raise ValueError(f"{where}: unknown source {raw.get('source')!r}; known: {', '.join(sources)}")
    values = {metric: parse_value(raw[metric], f"{where}.{metric}") for metric in metrics
              if raw.get(metric) is not None}
    return Record(str(raw["setting"]), str(raw["method"]), raw["source"], values, raw.get("cite"), raw.get("note"),
                  raw.get("verifier"))


@functools.lru_cache(maxsize=1)
def load_reference(path: Path = REFERENCE_FILE) -> Reference:
    data = yaml.safe_load(Path(path).read_text())
    sources = {key: Source(key, entry["label"], entry["description"]) for key, entry in data["sources"].items()}
    figures = tuple(_record(raw, FIGURE_METRICS, sources, f"{path.name}: figures[{i}]")
                    for i, raw in enumerate(data["figures"]))
    times = tuple(_record(raw, TIME_METRICS, sources, f"{path.name}: times[{i}]")
                  for i, raw in enumerate(data["times"]))
    return Reference(sources, figures, times)
