"""Benchmark suites: named lists of jobs, read from YAML.

A suite is a YAML file (the shipped ones are ``bench/suites/<name>.yaml``; a user suite is any
file with the same schema)::

    description: what the suite is for
    seeds: [0]                          # default seeds of every group
    certify:                            # the cascade of every group (group keys override)
      stages: [ibp, crown-ibp, attack]  # or "ibp,crown-ibp,attack"
      timeout: 60                       # seconds per sample
      count: 1000                       # first N test samples (null: all)
      attack_steps: 50                  # PGD of the attack stage
      attack_restarts: 5
      apgd: false                       # true: APGD-CE and APGD-T after PGD on what PGD left
    analyses:                           # optional: name -> options (null: the defaults)
      utilization: {count: 1000}
    groups:
      - settings: [mnist-0.1, mnist-0.3]    # presets SETTING/METHOD for every pair ...
        methods: [ibp, sabr]
        seeds: [0, 1, 2]                    # optional, replaces the suite's seeds
        overrides: [optim.epochs=10]        # optional, --set style
        certify: {stages: [ibp, attack]}    # optional, merged over the suite's
        analyses: {}                        # optional, replaces the suite's
      - presets: [mnist-0.1/pgd]            # ... or named presets
      - configs: [my_model.yaml]            # ... or YAML configs (relative to the suite file)
        setting: my-setting                 # the row label (default: the config's preset setting, else the file name)

A job's setting label is the preset's SETTING (or the group's ``setting``), its method label the
resolved ``method.name``. Unknown keys, presets, stages, analyses, bad values and duplicate
jobs are errors (``SuiteError``) that name the place in the file and the fix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, config_to_dict, did_you_mean, read_yaml
from .analyses import ANALYSES, DEFAULT_COUNT
from .jobs import AnalysisSpec, CertifySpec, Job, canonical_config

SUITE_DIR = Path(__file__).parent / "suites"
SUITE_KEYS = ("description", "seeds", "certify", "analyses", "groups")
GROUP_FORMS = ("settings", "presets", "configs")
GROUP_KEYS = ("settings", "methods", "presets", "configs", "setting", "seeds", "overrides", "certify", "analyses")
CERTIFY_KEYS = tuple(field.name for field in dataclasses.fields(CertifySpec))


class SuiteError(ConfigError):
    """A suite file is wrong; the message names the place and the fix."""


@dataclass(frozen=True)
class Suite:
    """A suite and its jobs; ``whole`` when the jobs are exactly those its file defines (not
    narrowed by ``--only`` or its seeds replaced by ``--seeds``)."""

    name: str
    path: Path
    description: str
    definition: dict[str, Any]
    jobs: tuple[Job, ...]
    whole: bool = True


def suite_names() -> list[str]:
    return sorted(path.stem for path in SUITE_DIR.glob("*.yaml"))


def suite_path(name: str) -> Path:
    """The file of a shipped suite name or a user's YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path
    shipped = SUITE_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise SuiteError(f"unknown suite {name!r}; shipped suites: {', '.join(suite_names())}, or give a YAML file"
                         + did_you_mean(name, suite_names()))
    return shipped


def load_suite(name: str, seeds: list[int] | None = None) -> Suite:
    """The suite ``name`` (shipped name or YAML path) with its jobs resolved; ``seeds``
    replaces the seeds of every group."""
    path = suite_path(name)
    data = read_yaml(path)
    suite_name = path.stem
    _check_keys(data, SUITE_KEYS, f"suite {suite_name}")
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise SuiteError(f"suite {suite_name}: 'groups' must be a non-empty list of job groups (see the schema in "
                         f"`ctbench.bench.suites`)")
    defaults = {"seeds": _seeds(data.get("seeds", [0]), f"suite {suite_name}: seeds"),
                "certify": _mapping(data.get("certify"), f"suite {suite_name}: certify"),
                "analyses": data.get("analyses")}
    jobs: list[Job] = []
    for number, group in enumerate(groups):
        jobs += _group_jobs(group, defaults, seeds, path, f"suite {suite_name}: groups[{number}]")
    _check_unique(jobs, suite_name)
    return Suite(suite_name, path, str(data.get("description", "")), data, tuple(jobs), whole=seeds is None)


def select_jobs(suite: Suite, patterns: list[str]) -> Suite:
    """The suite with only the jobs matching one of the shell patterns (``--only``), each matched
    against "SETTING/METHOD/seedK", e.g. ``mnist-mini-0.1/sabr/*`` or ``*/crown_ibp/seed0``; a
    pattern that matches no job is refused, naming the suite's jobs."""
    import fnmatch

    names = [f"{job.setting}/{job.method}/seed{job.seed}" for job in suite.jobs]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern) and not fnmatch.filter(names, f"{pattern}/*"):
            raise SuiteError(f"--only {pattern!r} matches no job of suite {suite.name}; its jobs are "
                             f"{', '.join(names)} (patterns are SETTING/METHOD[/seedK], shell wildcards allowed)")
    jobs = tuple(job for job, name in zip(suite.jobs, names)
                 if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name, f"{p}/*") for p in patterns))
    return dataclasses.replace(suite, jobs=jobs, whole=False)


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (the --seeds option)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SuiteError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
    return _seeds(values, "--seeds")


# ----------------------------------------------------------------------------------------------
# groups


def _group_jobs(group: Any, defaults: dict, seeds: list[int] | None, path: Path, where: str) -> list[Job]:
    group = _mapping(group, where)
    _check_keys(group, GROUP_KEYS, where)
    forms = [form for form in GROUP_FORMS if form in group]
    if len(forms) != 1:
        raise SuiteError(f"{where}: give exactly one of settings (with methods), presets or configs, got "
                         f"{', '.join(forms) or 'none'}")
    group_seeds = seeds or _seeds(group.get("seeds", defaults["seeds"]), f"{where}.seeds")
    overrides = tuple(_strings(group.get("overrides", []), f"{where}.overrides", empty_ok=True))
    certify = _certify_spec({**defaults["certify"], **_mapping(group.get("certify"), f"{where}.certify")},
                            f"{where}.certify")
    analyses = _analysis_specs(group.get("analyses", defaults["analyses"]), f"{where}.analyses")
    jobs = []
    for source, setting in _sources(group, forms[0], path, where):
        for seed in group_seeds:
            config = _resolve(source, [*overrides, f"seed={seed}"], f"{where} ({source})")
            jobs.append(Job(setting, config["method"]["name"], seed, str(source), overrides, config, certify,
                            analyses))
    return jobs


def _sources(group: Mapping, form: str, path: Path, where: str) -> list[tuple[str, str]]:
    """(preset name or config path, setting label) for each entry of the group."""
    if form == "settings":
        if "methods" not in group:
            raise SuiteError(f"{where}: settings needs methods (the presets are SETTING/METHOD)")
        if "setting" in group:
            raise SuiteError(f"{where}: setting (a row label) goes with presets or configs; settings name it already")
        settings = _strings(group["settings"], f"{where}.settings")
        methods = _strings(group["methods"], f"{where}.methods")
        return [(f"{setting}/{method}", setting) for setting in settings for method in methods]
    if "methods" in group:
        raise SuiteError(f"{where}: methods goes with settings, not with {form}")
    if form == "presets":
        label = group.get("setting")
        return [(name, label or name.partition("/")[0]) for name in _strings(group["presets"], f"{where}.presets")]
    entries = []
    for name in _strings(group["configs"], f"{where}.configs"):
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        entries.append((str(file), group.get("setting") or _config_setting(file, where)))
    return entries


def _config_setting(file: Path, where: str) -> str:
    if not file.is_file():
        raise SuiteError(f"{where}: config file {file} does not exist (paths are relative to the suite file)")
    base = read_yaml(file).get("preset")
    return str(base).partition("/")[0] if base else file.stem


def _resolve(source: str, overrides: list[str], where: str) -> dict[str, Any]:
    from ..presets import load_config

    try:
        return config_to_dict(canonical_config(load_config(source, overrides)))
    except ConfigError as error:
        raise SuiteError(f"{where}: {error}") from None


def _check_unique(jobs: list[Job], suite_name: str) -> None:
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.job_key in seen:
            raise SuiteError(f"suite {suite_name}: {job.label} ({job.source}) is listed twice with the same config "
                             f"and certification (also as {seen[job.job_key].source}); remove one")
        seen[job.job_key] = job


# ----------------------------------------------------------------------------------------------
# certify and analyses


def _certify_spec(data: Mapping[str, Any], where: str) -> CertifySpec:
    from ..certify import CertifyInputError, stage_names

    _check_keys(data, CERTIFY_KEYS, where)
    values = dict(data)
    try:
        if "stages" in values:
            values["stages"] = stage_names(values["stages"])
    except CertifyInputError as error:
        raise SuiteError(f"{where}.stages: {error}") from None
    if "timeout" in values:
        values["timeout"] = _positive_number(values["timeout"], f"{where}.timeout")
    if values.get("count") is not None:
        values["count"] = _integer(values["count"], 1, f"{where}.count", "; null: the whole test set")
    for key in ("attack_steps", "attack_restarts"):
        if key in values:
            values[key] = _integer(values[key], 0, f"{where}.{key}")
    if "apgd" in values and not isinstance(values["apgd"], bool):
        raise SuiteError(f"{where}.apgd must be true or false, got {values['apgd']!r}")
    return CertifySpec(**values)


def _analysis_specs(data: Any, where: str) -> tuple[AnalysisSpec, ...]:
    specs = []
    for name, options in _mapping(data, where).items():
        if name not in ANALYSES:
            raise SuiteError(f"{where}: unknown analysis {name!r}; known: {', '.join(ANALYSES)}"
                             + did_you_mean(str(name), ANALYSES))
        options = dict(_mapping(options, f"{where}.{name}"))
        analysis = ANALYSES[name]
        _check_keys(options, ("count", *analysis.defaults), f"{where}.{name}")
        count = _integer(options.pop("count", DEFAULT_COUNT), 1, f"{where}.{name}.count")
        for key, value in options.items():
            options[key] = _integer(value, analysis.minimums.get(key, 0), f"{where}.{name}.{key}")
        specs.append(AnalysisSpec(name, count, {**analysis.defaults, **options}))
    return tuple(specs)


# ----------------------------------------------------------------------------------------------
# small checks


def _check_keys(data: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise SuiteError(f"{where}: unknown key {key!r}; valid keys: {', '.join(allowed)}"
                             + did_you_mean(str(key), allowed))


def _mapping(value: Any, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SuiteError(f"{where}: expected a mapping of keys to values, got {value!r}")
    return value


def _strings(value: Any, where: str, empty_ok: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not (value or empty_ok)
            or not all(isinstance(item, str) and item for item in value)):
        raise SuiteError(f"{where}: expected a {'' if empty_ok else 'non-empty '}list of strings, got {value!r}")
    return value


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{where}: expected a non-empty list of seeds such as [0, 1, 2], got {value!r}")
    seeds = [_integer(item, 0, where) for item in value]
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: a seed is listed twice in {seeds}")
    return seeds


def _integer(value: Any, minimum: int, where: str, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SuiteError(f"{where}: expected an integer >= {minimum}, got {value!r}{note}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise SuiteError(f"{where}: expected a number of seconds > 0, got {value!r}")
    return float(value)
