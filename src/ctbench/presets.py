"""Presets: one YAML per setting x method under ``configs/<setting>/<method>.yaml``, merged over
the setting's shared ``configs/<setting>/setting.yaml`` (schedule, model, data, attack)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import (
    ConfigError, TrainConfig, apply_overrides, config_from_dict, did_you_mean, merge, read_yaml, saved_config_from_dict,
)

CONFIG_DIR = Path(__file__).parent / "configs"
SETTING_FILE = "setting.yaml"


def preset_names() -> list[str]:
    return sorted(f"{path.parent.name}/{path.stem}" for path in CONFIG_DIR.glob("*/*.yaml")
                  if path.name != SETTING_FILE)


def preset_data(name: str) -> dict[str, Any]:
    setting, _, method = name.partition("/")
    path = CONFIG_DIR / setting / f"{method}.yaml"
    if not method or not path.exists():
        raise ConfigError(_unknown_preset(name))
    base = CONFIG_DIR / setting / SETTING_FILE
    return merge(read_yaml(base) if base.exists() else {}, read_yaml(path))


def _unknown_preset(name: str) -> str:
    names = preset_names()
    settings = sorted({known.partition("/")[0] for known in names})
    methods = sorted({known.partition("/")[2] for known in names})
    return (f"unknown preset {name!r}; a preset is SETTING/METHOD with SETTING one of {', '.join(settings)} and "
            f"METHOD one of {', '.join(methods)} (`ctbench presets` lists them){did_you_mean(name, names)}")


def source_data(source: str | Path) -> dict[str, Any]:
    """Config data from a preset name, a YAML file (which may name a ``preset`` to start from)
    or a run folder (its config.yaml)."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.yaml"
        if not path.exists():
            raise ConfigError(f"{source} is a folder without config.yaml; give a preset, a YAML file or a run folder")
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = read_yaml(path)
        base = data.pop("preset", None)
        return merge(preset_data(base), data) if base else data
    return preset_data(str(source))


def load_config(source: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config of a preset, a YAML file, or a run folder (read as a saved config)."""
    read = saved_config_from_dict if Path(source).is_dir() else config_from_dict
    return read(apply_overrides(source_data(source), overrides or []))


def default_run_folder(source: str | Path) -> Path:
    """Where ``ctbench train SOURCE`` writes without --out: a run folder itself (to resume it),
    else runs/<preset> or runs/<YAML file stem>."""
    path = Path(source)
    if path.is_dir():
        return path
    return Path("runs") / (path.stem if path.suffix in (".yaml", ".yml") else str(source))


def describe(name: str) -> dict[str, Any]:
    config = load_config(name)
    return {"name": name, "dataset": config.data.dataset, "model": config.model.architecture,
            "method": config.method.name, "train_eps": config.eps.train_eps, "test_eps": config.eps.test_eps,
            "epochs": config.optim.epochs}
