"""A hyper-parameter sweep: a preset, fixed overrides, a grid of values per config key, seeds.

``make_sweep`` checks everything before anything trains: each grid key and value is resolved
through the config (unknown keys, wrong types and values out of range are the config's own
errors), every grid point must make a valid config, and the config must keep a validation split
(the sweep selects on validation accuracy and never looks at the test set). Grid values are
kept in their resolved form (``1e-6`` and ``0.000001`` are one value), so a point's run folder
and its Optuna parameters do not depend on how a value was written.

A grid point is trained once per seed, into
``ROOT/sweeps/<study>/<key=value,...>/seed<S>-<hash>`` (the hash is that of the resolved config and
the ctbench version, as for benchmark jobs). The study name defaults to
``<preset>-<hash of the definition>``, so the same arguments find the same study.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..config import ConfigError, TrainConfig, apply_overrides, config_from_dict, config_to_dict, merge
from ..presets import preset_data
from .jobs import canonical_config, content_hash

GridValue = Any  # None, bool, int, float or str: what Optuna's GridSampler stores


class SweepError(ConfigError):
    """A sweep's arguments are wrong; the message names the cause and the fix."""


@dataclass(frozen=True, eq=False)
class Sweep:
    """``grid`` maps a dotted config key to its resolved values, in the order given."""

    preset: str
    overrides: tuple[str, ...]
    grid: dict[str, tuple[GridValue, ...]]
    seeds: tuple[int, ...]
    study: str

    def definition(self) -> dict[str, Any]:
        """What makes the sweep (kept with its study, which refuses another definition)."""
        return {"preset": self.preset, "overrides": list(self.overrides),
                "grid": {key: list(values) for key, values in self.grid.items()}, "seeds": list(self.seeds)}

    def points(self) -> list[dict[str, GridValue]]:
        """Every grid point, as {key: value}."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def config(self, params: dict[str, GridValue], seed: int) -> TrainConfig:
        return canonical_config(config_from_dict(_with_params(_base_data(self.preset, self.overrides), params, seed)))

    def run_dir(self, root: Path, params: dict[str, GridValue], seed: int) -> Path:
        key = content_hash({"config": config_to_dict(self.config(params, seed)), "version": __version__})
        return Path(root) / "sweeps" / safe_name(self.study) / safe_name(point_label(params)) / f"seed{seed}-{key[:10]}"


def preset_params(definition: dict[str, Any]) -> dict[str, GridValue]:
    """The values the preset (with the sweep's fixed overrides) itself gives the grid keys."""
    resolved = config_to_dict(config_from_dict(_base_data(definition["preset"], tuple(definition["overrides"]))))
    return {key: _lookup(resolved, key) for key in definition["grid"]}


def point_label(params: dict[str, GridValue]) -> str:
    return ",".join(f"{key}={value}" for key, value in params.items())


def safe_name(text: str) -> str:
    """``text`` as one folder name: characters other than letters, digits and ``.=,+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9.=,+-]", "_", text)


def _base_data(preset: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    return apply_overrides(preset_data(preset), list(overrides))


def _with_params(data: dict[str, Any], params: dict[str, GridValue], seed: int) -> dict[str, Any]:
    for key, value in params.items():
        data = merge(data, nested(key, value))
    return {**data, "seed": seed}


def nested(key: str, value: Any) -> dict[str, Any]:
    """'optim.lr', 1e-3 -> {'optim': {'lr': 1e-3}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# ----------------------------------------------------------------------------------------------
# building a sweep from the command line


def make_sweep(preset: str, grid_texts: list[str], overrides: list[str] | None = None,
               seeds: list[int] | None = None, study: str | None = None) -> Sweep:
    """The sweep of ``preset`` (a SETTING/METHOD name) over ``grid_texts`` ("KEY=V1,V2,...")."""
    overrides = tuple(overrides or ())
    seeds = tuple(seeds if seeds is not None else (0,))
    if not grid_texts:
        raise SweepError("no grid: give at least one --grid KEY=V1,V2,... (e.g. --grid regularization.l1=1e-6,2e-6)")
    base = _base_data(preset, overrides)
    grid = {key: _resolved_values(base, key, values) for key, values in parse_grid(grid_texts).items()}
    sweep = Sweep(preset, overrides, grid, seeds, study or "")
    for params in sweep.points():
        _check_point(sweep, params)
    if study is None:
        sweep = Sweep(preset, overrides, grid, seeds, f"{preset}-{content_hash(sweep.definition(), 8)}")
    return sweep


def parse_grid(texts: list[str]) -> dict[str, list[Any]]:
    """["optim.lr=1e-3,2e-3", ...] -> {"optim.lr": [values parsed as YAML]}."""
    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SweepError(f"--grid {text!r} must look like KEY=V1,V2,... (e.g. method.w_rob=0.7,0.8,0.9,1.0)")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2,...")
        if key == "seed":
            raise SweepError("seeds are not a grid key: give them with --seeds 0,1,2")
        grid[key] = [yaml.safe_load(part) for part in _split_values(raw)]
    return grid


def _split_values(raw: str) -> list[str]:
    """Comma-separated values; commas inside brackets belong to a value ([10, 12])."""
    parts, depth, current = [], 0, ""
    for char in raw:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    if any(not part.strip() for part in parts):
        raise SweepError(f"--grid values {raw!r} hold an empty value; separate values by single commas")
    return [part.strip() for part in parts]


def _resolved_values(base: dict[str, Any], key: str, values: list[Any]) -> tuple[GridValue, ...]:
    resolved = []
    for value in values:
        try:
            config = config_from_dict(merge(base, nested(key, value)))
        except ConfigError as error:
            raise SweepError(f"--grid {key}={value}: {error}") from None
        found = _lookup(config_to_dict(config), key)
        if not (found is None or isinstance(found, (bool, int, float, str))):
            raise SweepError(f"--grid {key}: its values are {type(found).__name__}s; a grid takes numbers, strings "
                             f"and booleans: sweep {key} with --set in separate sweeps")
        if found in resolved:
            raise SweepError(f"--grid {key}: the value {value!r} is listed twice (as {found!r})")
        resolved.append(found)
    return tuple(resolved)


def _lookup(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SweepError(f"--grid {key}: not a config key (a key names one value, e.g. optim.lr)")
        node = node[part]
    return node


def _check_point(sweep: Sweep, params: dict[str, GridValue]) -> None:
    try:
        config = sweep.config(params, sweep.seeds[0])
    except ConfigError as error:
        raise SweepError(f"the grid point {point_label(params)} makes an invalid config: {error}") from None
    if config.data.validation_size == 0:
        raise SweepError(f"a sweep selects on the validation split, but data.validation_size is 0 "
                         f"(grid point {point_label(params)}); the test set is kept for the final numbers only: "
                         f"give the sweep a validation split, e.g. --set data.validation_size=5000")
