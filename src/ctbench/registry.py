"""Name -> object tables, so configs can pick methods, datasets, models and stages by name."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .config import ConfigError, did_you_mean
from .plugins import PLUGIN_HINT, PluginError, entry_point_objects, import_listed_plugins

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries of one kind (e.g. "method"); duplicate names are an error.
    ``key`` is the config key that names an entry (e.g. "method.name"), for error messages.

    The first lookup imports the plugins: the modules of ``$CTBENCH_PLUGINS`` (``--plugin``) and
    the entry points of ``plugin_group`` (see ``ctbench.plugins``). ``hint`` ends the message
    for an unknown name (e.g. another way to get one)."""

    def __init__(self, kind: str, key: str | None = None, plugin_group: str | None = None, hint: str = "") -> None:
        self.kind = kind
        self.key = key
        self.plugin_group = plugin_group
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def _load_plugins(self) -> None:
        """Once: import the --plugin modules and register the entry points of plugin_group."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first: a plugin's own lookups while it is imported must not recurse
        try:
            import_listed_plugins()
            for name, entry, description in entry_point_objects(self.plugin_group) if self.plugin_group else []:
                if self._entries.get(name) is entry:  # its module registered it on import
                    continue
                if name in self._entries:
                    raise PluginError(f"{description}: a {self.kind} named {name!r} is already registered; rename "
                                      "the entry point")
                self._entries[name] = entry
        except PluginError:
            self._plugins_loaded = False  # the next lookup raises the error again instead of missing the plugin
            raise

    def get(self, name: str) -> T:
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            where = f" ({self.key})" if self.key else ""
            hints = [self.hint] if self.hint else []
            if self.plugin_group:
                hints.append(PLUGIN_HINT.format(group=self.plugin_group))
            message = f"unknown {self.kind} {name!r}{where}; known: {', '.join(self.names())}" + did_you_mean(
                str(name), self.names())
            if hints:
                message += ("" if message.endswith("?") else ".") + "".join(f" {hint}" for hint in hints)
            raise ConfigError(message) from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
