"""Plugins: your own models, datasets and methods, known to every ctbench command.

Two ways in:

* ``--plugin MODULE`` (any command, repeatable; ``use_plugins``): a dotted module name importable
  from ``sys.path``, or the path of a ``.py`` file, imported before the command runs. Importing it
  registers its entries (``MODELS.register("name")(builder)`` and the like). The modules are also
  listed in ``$CTBENCH_PLUGINS`` (separated by ``os.pathsep``), which every registry imports on its
  first lookup, so worker processes (``--workers``) know the same names.
* entry points of an installed package, in the groups ``ctbench.models``, ``ctbench.datasets``
  and ``ctbench.methods``: the entry point's name is the name to register and its object the
  entry itself: a model builder ``(InputSpec, batch_norm) -> nn.Sequential``, a
  ``ctbench.data.DatasetInfo``, a ``ctbench.methods.Method`` subclass (not a function that
  registers them). A registry loads its group once, on its first lookup.

A plugin that fails to import is a ``PluginError`` naming the plugin and the exception.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from .config import ConfigError

PLUGINS_ENV = "CTBENCH_PLUGINS"
PLUGIN_HINT = "Register your own with --plugin MODULE or a '{group}' entry point (README, 'Your own models and data')."

_imported: dict[str, ModuleType] = {}  # plugin argument -> its module, so each is imported once


class PluginError(ConfigError):
    """A plugin could not be imported or registered; the message names the plugin and the cause."""


def _is_file(plugin: str) -> bool:
    return plugin.endswith(".py") or os.sep in plugin or (os.altsep is not None and os.altsep in plugin)


def import_plugin(plugin: str) -> ModuleType:
    """Import a plugin module (a dotted name or a ``.py`` file) once."""
    key = str(Path(plugin).resolve()) if _is_file(plugin) else plugin
    if key in _imported:
        return _imported[key]
    try:
        module = _import_file(Path(key)) if _is_file(plugin) else importlib.import_module(plugin)
    except PluginError:
        raise
    except ModuleNotFoundError as error:
        raise PluginError(f"plugin {plugin!r} failed to import: {error.__class__.__name__}: {error} (give a module "
                          "importable from sys.path, e.g. mypackage.ctbench_plugin, or the path of a .py file, e.g. "
                          "./my_plugin.py)") from error
    except Exception as error:
        raise PluginError(f"plugin {plugin!r} failed to import: {error.__class__.__name__}: {error}") from error
    _imported[key] = module
    return module


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"plugin file {path} does not exist")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def use_plugins(plugins: Iterable[str]) -> None:
    """Import the ``--plugin`` modules now, and list them in ``$CTBENCH_PLUGINS`` for worker processes."""
    plugins = list(plugins)
    for plugin in plugins:
        import_plugin(plugin)
    listed = [plugin for plugin in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if plugin]
    for plugin in plugins:
        entry = str(Path(plugin).resolve()) if _is_file(plugin) else plugin
        if entry not in listed:
            listed.append(entry)
    if listed:
        os.environ[PLUGINS_ENV] = os.pathsep.join(listed)


def import_listed_plugins() -> None:
    """Import the modules of ``$CTBENCH_PLUGINS`` (those a parent process was given with --plugin)."""
    for plugin in os.environ.get(PLUGINS_ENV, "").split(os.pathsep):
        if plugin:
            import_plugin(plugin)


def entry_point_objects(group: str) -> list[tuple[str, Any, str]]:
    """(name, object, description for messages) of every entry point in ``group``, each loaded (imported)."""
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=group):
        distribution = getattr(entry_point, "dist", None)
        origin = f" of {distribution.name}" if distribution is not None else ""
        description = f"plugin {entry_point.name!r} (entry point {entry_point.value!r} in group {group!r}{origin})"
        try:
            loaded.append((entry_point.name, entry_point.load(), description))
        except Exception as error:
            raise PluginError(f"{description} failed to load: {error.__class__.__name__}: {error}") from error
    return loaded
