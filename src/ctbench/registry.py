"""Name -> object tables, so configs can pick methods, datasets, models and stages by name."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .config import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries of one kind (e.g. "method"); duplicate names are an error.
    ``key`` is the config key that names an entry (e.g. "method.name"), for error messages."""

    def __init__(self, kind: str, key: str | None = None) -> None:
        self.kind = kind
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            where = f" ({self.key})" if self.key else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{where}; known: {', '.join(self.names())}"
                              + did_you_mean(str(name), self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
