"""Benchmark jobs: what one job is, its keys, and where its files go.

A job is a resolved training config (a preset or YAML file, overrides, a seed), the
certification settings (``CertifySpec``) and the chosen analyses (``AnalysisSpec``). Its
keys are content hashes:

* ``train_key``: the resolved config (``config_to_dict``, then ``canonical_config``) and the
  ctbench version; it names the run folder, so jobs that differ only in their certification
  share one trained model;
* ``certify_key``: the certification settings; it names the verdicts folder inside the run;
* ``job_key``: config, certification settings and version together; the job's id in the
  results database.

Layout under the bench root (default ``runs/bench``)::

    runs/<setting>/<method>/seed<seed>-<train_key[:10]>/       the run folder (Trainer files)
        bench-train.json                                       the train phase record
        bench-status.txt                                       the phase now running (progress)
        certify-<certify_key[:10]>/                            verdicts.jsonl, summary.json, ...
            bench-certify.json                                 the certify phase record
        analyses/<name>.json                                   one analysis phase record each
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..config import TrainConfig

DEFAULT_STAGES = ("ibp", "crown-ibp", "attack", "alpha-crown", "bab")
FALSIFYING_STAGES = ("attack", "bab", "milp")  # stages that can find a counterexample


def canonical_config(config: "TrainConfig") -> "TrainConfig":
    """The resolved config as a job trains and hashes it. For a method that trains without
    attacks, attack.precision changes nothing; it is set to float32 (its default before "auto"),
    so that such a job keeps one run folder and key whatever that setting says."""
    from ..methods import METHODS

    name = config.method.name
    if name not in METHODS or METHODS.get(name).trains_with_attacks or config.attack.precision == "float32":
        return config
    return dataclasses.replace(config, attack=dataclasses.replace(config.attack, precision="float32"))


def content_hash(data: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``data`` (sorted keys), as ``length`` hex digits."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class CertifySpec:
    """How a job certifies: the cascade's stages and per-sample timeout (seconds), the first
    ``count`` test samples (None: all), the attack stage's PGD steps and restarts, and whether
    that stage goes on with APGD-CE and APGD-T (100 iterations each, 9 targets) where PGD fails."""

    stages: tuple[str, ...] = DEFAULT_STAGES
    timeout: float = 1000.0
    count: int | None = None
    attack_steps: int = 50
    attack_restarts: int = 5
    apgd: bool = False

    def record(self) -> dict[str, Any]:
        record = {"stages": list(self.stages), "timeout": self.timeout, "count": self.count,
                  "attack_steps": self.attack_steps, "attack_restarts": self.attack_restarts}
        return {**record, "apgd": True} if self.apgd else record  # without APGD, the keys of earlier jobs

    @property
    def attack_description(self) -> str:
        pgd = f"PGD {self.attack_steps}x{self.attack_restarts} (margin loss)"
        return pgd + ", then APGD-CE and APGD-T (100 iterations, 9 targets)" if self.apgd else pgd

    @property
    def finds_counterexamples(self) -> bool:
        """Whether a stage can falsify, so that the adversarial accuracy is measured."""
        return any(stage in FALSIFYING_STAGES for stage in self.stages)

    def settings(self):
        """The cascade's ``CertifySettings`` (as ``ctbench certify`` builds them)."""
        from ..certify import AttackSettings, BabSettings, CertifySettings

        return CertifySettings(stages=self.stages, timeout=self.timeout,
                               attack=AttackSettings(pgd_steps=self.attack_steps, pgd_restarts=self.attack_restarts,
                                                     apgd_ce=self.apgd, apgd_t=self.apgd),
                               bab=BabSettings(timeout=self.timeout))


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis of a job's model on the first ``count`` test samples, with its options."""

    name: str
    count: int = 1000
    options: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "options": dict(sorted(self.options.items()))}


@dataclass(frozen=True, eq=False)
class Job:
    """One benchmark job. ``config`` is the resolved config as plain data (``config_to_dict``),
    ``source`` the preset name or YAML file it came from, ``overrides`` the suite's overrides."""

    setting: str
    method: str
    seed: int
    source: str
    overrides: tuple[str, ...]
    config: dict[str, Any]
    certify: CertifySpec
    analyses: tuple[AnalysisSpec, ...] = ()

    @property
    def train_key(self) -> str:
        return content_hash({"config": self.config, "version": __version__})

    @property
    def certify_key(self) -> str:
        return content_hash(self.certify.record())

    @property
    def job_key(self) -> str:
        return content_hash({"config": self.config, "certify": self.certify.record(), "version": __version__})

    @property
    def label(self) -> str:
        return f"{self.setting}/{self.method} seed {self.seed}"

    def run_dir(self, root: Path) -> Path:
        return Path(root) / "runs" / self.setting / self.method / f"seed{self.seed}-{self.train_key[:10]}"

    def certify_dir(self, root: Path) -> Path:
        return self.run_dir(root) / f"certify-{self.certify_key[:10]}"

    def record(self) -> dict[str, Any]:
        """The job as plain data (what the database keeps of it)."""
        return {"setting": self.setting, "method": self.method, "seed": self.seed, "source": self.source,
                "overrides": list(self.overrides), "certify": self.certify.record(),
                "analyses": [spec.record() for spec in self.analyses]}


# ----------------------------------------------------------------------------------------------
# phase records on disk

TRAIN_RECORD = "bench-train.json"
CERTIFY_RECORD = "bench-certify.json"
STATUS_FILE = "bench-status.txt"
ANALYSES_DIR = "analyses"


def read_record(path: Path) -> dict[str, Any] | None:
    """A phase record (JSON), or None when there is none yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def train_record_path(job: Job, root: Path) -> Path:
    return job.run_dir(root) / TRAIN_RECORD


def certify_record_path(job: Job, root: Path) -> Path:
    return job.certify_dir(root) / CERTIFY_RECORD


def analysis_record_path(job: Job, root: Path, spec: AnalysisSpec) -> Path:
    return job.run_dir(root) / ANALYSES_DIR / f"{spec.name}.json"


def phase_done(path: Path, expected: dict[str, Any] | None = None) -> bool:
    """Whether the record at ``path`` says done (and, for analyses, was made with ``expected``)."""
    record = read_record(path)
    if record is None or record.get("status") != "done":
        return False
    return expected is None or record.get("spec") == expected


def job_done(job: Job, root: Path) -> bool:
    """Every phase of the job finished: training, certification and each chosen analysis."""
    return (phase_done(train_record_path(job, root)) and phase_done(certify_record_path(job, root))
            and all(phase_done(analysis_record_path(job, root, spec), spec.record()) for spec in job.analyses))
