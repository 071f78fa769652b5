"""One helper for every swap point: a name in a config chooses an implementation.

Reward models, image tokenizers, token formats, guidance rules, advantage, KL and log-probability
estimators and weight-sync transports are each a ``Registry``. Registering twice under one name is
refused (a plugin would silently replace a built-in), and an unknown name fails the same way
everywhere: one line with the config key when there is one, and the names that exist.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pararl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the entries are, for messages: "reward model", "KL estimator"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` over a class or function."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); choose another name")
        self._entries[name] = obj

    def remove(self, name: str) -> T:
        """Take an entry out (a plugin or a test that registered one for a while)."""
        return self._entries.pop(self.check(name))

    def get(self, name: str, key: str | None = None) -> T:
        """The entry for ``name``; ``key`` is the config key that named it, for the message."""
        if name not in self._entries:
            raise ConfigError(self.unknown(name, key))
        return self._entries[name]

    def check(self, name: str, key: str | None = None) -> str:
        """Refuse an unknown name now (at config load), without building anything."""
        self.get(name, key)
        return name

    def unknown(self, name: str, key: str | None = None) -> str:
        where = f"{key}={name!r} is not a known {self.kind}" if key else f"unknown {self.kind} {name!r}"
        return f"{where}; known: {', '.join(self.names()) or '(none)'}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
