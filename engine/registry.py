"""Name -> builder maps for models, datasets, processors and tasks.

Modelled on timm's registry: builders register themselves with a decorator and
there is one lookup path. Two rules LAVIS's registry did not keep:

* a lookup of an unknown name raises, listing the closest registered names and
  how to list them all (it never returns None);
* registering the same name twice is an error, not a silent overwrite.

The registries are filled by importing the packages that define the builders.
``Registry.get`` and ``Registry.names`` import them on first use, so a lookup
never depends on which modules the caller happened to import first.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, Iterator, List, Optional

# Packages whose import registers builders. Importing them does no work
# beyond defining classes and functions.
_PROVIDERS = ("engine.models", "engine.data", "engine.tasks")
_populated = False


def _populate() -> None:
    global _populated
    if _populated:
        return
    _populated = True
    for mod in _PROVIDERS:
        importlib.import_module(mod)


class RegistryError(KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


def close_matches(name: str, choices, n: int = 3) -> List[str]:
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)


class Entry:
    """One registered builder plus optional metadata (schema, zoo, docs)."""

    def __init__(self, name: str, obj: Any, meta: Dict[str, Any]):
        self.name = name
        self.obj = obj
        self.meta = meta

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
            if key in self._entries:
                prev = self._entries[key].obj
                raise RegistryError(
                    f"{self.kind} '{key}' is registered twice: first by "
                    f"{getattr(prev, '__module__', '?')}.{getattr(prev, '__qualname__', prev)}, "
                    f"again by {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}. "
                    f"Give one of them another name."
                )
            self._entries[key] = Entry(key, obj, meta)
            return obj

        return deco

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
