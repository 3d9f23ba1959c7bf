"""Typed coercion of recipe values: YAML values -> the annotated types of a schema dataclass, every problem
recorded with its dotted key (never raised one at a time), and the type names --help and docs show."""
from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, Dict, List, Literal, Optional, Tuple

from engine.problems import Problem, fmt, suggest

logger = logging.getLogger("engine.config")  # the recipe's warnings, under the schema's name as before


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{' | '.join(type_name(a) for a in args)} or null"
    if origin in (list, List):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, key: str, problems: List[Problem]) -> Any:
    """Return value converted to type ``tp`` or record a problem (and return it unchanged)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], key, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = suggest(str(value), [str(c) for c in choices])
        problems.append(Problem(key, f"{fmt(value)} is not allowed; choose one of {', '.join(map(str, choices))}{hint}"))
        return value
    if origin in (list, List):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `train_splits: train` means ["train"]
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(key, f"{fmt(value)} should be a {type_name(tp)}"))
            return value
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            problems.append(Problem(key, f"{fmt(value)} should be a mapping"))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(Problem(key, f"{fmt(value)} should be a {type_name(tp)}"))
            return value
        return build_dataclass(tp, value, key, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(Problem(key, f"{fmt(value)} should be true or false"))
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(Problem(key, f"{fmt(value)} should be an integer"))
        return value
    if tp is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string; LAVIS recipes are full of these.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(Problem(key, f"{fmt(value)} should be a number"))
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(Problem(key, f"{fmt(value)} should be a string"))
        return value
    return value


def nullable(tp) -> bool:
    """True for ``Optional[...]`` (and Any): null is a value of the key, not "unset"."""
    return tp is Any or (typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp))


def build_dataclass(cls, data: Dict[str, Any], prefix: str, problems: List[Problem],
                    ignored: Optional[Dict[str, str]] = None):
    """Instantiate ``cls`` from a mapping, recording unknown keys, missing required keys and type errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            if ignored and key in ignored:
                logger.warning("%s is ignored: %s.", path, ignored[key])
                continue
            problems.append(Problem(path, f"unknown key{suggest(key, fields)} "
                                          f"(valid keys: {', '.join(fields)})"))
            continue
        if value is None and not nullable(hints[key]):
            continue  # null unsets a key: its default applies (a required key is then reported missing)
        kwargs[key] = coerce(value, hints[key], path, problems)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in kwargs and no_default:
            problems.append(Problem(f"{prefix}.{name}" if prefix else name,
                                    f"is required ({f.metadata.get('help', type_name(hints[name]))})"))
            kwargs[name] = None
    return cls(**kwargs)


def field_docs(cls) -> List[Tuple[str, str, Any, str]]:
    """(name, type, default, help) of each field of a schema dataclass, for --help and docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
