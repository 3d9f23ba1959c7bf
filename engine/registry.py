"""Name -> builder maps for models, datasets, processors and tasks.

Modelled on timm's registry: builders register themselves with a decorator and
there is one lookup path. Two rules LAVIS's registry did not keep:

* a lookup of an unknown name raises, listing the closest registered names and
  how to list them all (it never returns None);
* registering the same name twice is an error, not a silent overwrite.

Built-in names are declared in light catalog modules (``engine/models/catalog.py``,
``engine/data/catalog.py``, ``engine/tasks/catalog.py``) with their metadata (zoo, schema,
arguments, metric names) and the ``"module:attribute"`` of their builder. The builder's module
(torch, transformers) is imported only when the builder itself is used, so a recipe is checked
against everything the registry knows without importing anything heavy. ``Registry.get`` and
``Registry.names`` load the catalogs on first use, so a lookup never depends on which modules the
caller happened to import first. ``register`` (a decorator) adds a builder that is already imported.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, Iterator, List, Optional

# Modules whose import declares the built-in names. They import nothing heavy.
_PROVIDERS = ("engine.models.catalog", "engine.data.catalog", "engine.tasks.catalog")
_populated = False


def _populate() -> None:
    global _populated
    if _populated:
        return
    _populated = True
    for mod in _PROVIDERS:
        importlib.import_module(mod)


def load(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names (its module imported on first use)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class RegistryError(KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


def close_matches(name: str, choices, n: int = 3) -> List[str]:
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)


class Entry:
    """One registered builder plus optional metadata (schema, zoo, docs).

    ``target`` (``"package.module:attribute"``) names a builder that is imported on first use of ``obj``.
    """

    def __init__(self, name: str, obj: Any, meta: Dict[str, Any], target: Optional[str] = None):
        self.name = name
        self.target = target
        self.meta = meta
        if obj is not None:
            self.__dict__["_obj"] = obj

    @property
    def obj(self) -> Any:
        if "_obj" not in self.__dict__:
            self.__dict__["_obj"] = load(self.target)
        return self.__dict__["_obj"]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["meta"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __call__(self, *args, **kwargs):
        return self.obj(*args, **kwargs)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: Optional[str] = None, **meta: Any) -> Callable:
        """Decorator: ``@MODELS.register("blip2_opt", zoo=ZOO)``."""

        def deco(obj):
            key = name or getattr(obj, "__name__")
            self._add(Entry(key, obj, meta), f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}")
            return obj

        return deco

    def declare(self, name: str, target: str, **meta: Any) -> None:
        """Register the builder ``target`` (``"package.module:attribute"``) without importing it."""
        self._add(Entry(name, None, meta, target=target), target.replace(":", "."))

    def _add(self, entry: Entry, where: str) -> None:
        prev = self._entries.get(entry.name)
        if prev is not None:
            first = prev.target.replace(":", ".") if prev.target else (
                f"{getattr(prev.obj, '__module__', '?')}.{getattr(prev.obj, '__qualname__', prev.obj)}")
            raise RegistryError(f"{self.kind} '{entry.name}' is registered twice: first by {first}, "
                                f"again by {where}. Give one of them another name.")
        self._entries[entry.name] = entry

    def unknown_message(self, name: str) -> str:
        names = self.names()
        near = close_matches(name, names)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        return (
            f"unknown {self.kind} '{name}'.{hint} Registered {self.kind}s: {', '.join(names)}. "
            f"List everything with: python -m engine list"
        )

    def get(self, name: str) -> Entry:
        _populate()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def names(self) -> List[str]:
        _populate()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _populate()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        _populate()
        return iter(self._entries[k] for k in sorted(self._entries))


MODELS = Registry("model")
DATASETS = Registry("dataset")
PROCESSORS = Registry("processor")
TASKS = Registry("task")
