"""Validation of the config records (ModelSpec, CacheSpec, SamplingConfig, JobConfig) with pydantic v2.

The records are frozen pydantic dataclasses with STRICT: unknown keys are errors, and no value
is coerced across types (a quoted "no" is not False, "8" is not 8). Python code builds them
directly; YAML and command-line data (plain dicts) go through `from_data`, which validates in
pydantic's JSON mode: the only place where nested sections may be given as mappings, and where
an int stands for a float. Errors name the field path: `cache.rho: ...`.

A leaf module (no lineray imports), so every floor may use it.
"""
from __future__ import annotations

import json
from typing import TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

STRICT = ConfigDict(extra="forbid", strict=True)

T = TypeVar("T")


def from_data(cls: type[T], data: dict | None, error: type[Exception] = ValueError, where: str = "") -> T:
    """`cls` from plain data (YAML, flags); `error` naming every bad field path when it does not fit."""
    try:
        text = json.dumps(data if data is not None else {})
    except (TypeError, ValueError) as e:  # YAML values JSON has no type for (dates, sets, ...)
        raise error(f"{where or 'settings'}: {e}") from None
    try:
        return TypeAdapter(cls).validate_json(text)
    except ValidationError as e:
        raise error(describe(e, where)) from None


def describe(e: ValidationError, where: str = "") -> str:
    """One line per problem: `model.checkpoint: ...`, unknown keys named as such."""
    lines = []
    for err in e.errors():
        # union members and our validators add loc parts that are not field names
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("int", "float", "str",
                                                                                               "function-after")))]
        path = ".".join(filter(None, [where, *loc])) or where or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            section = path.rpartition(".")[0].rpartition(".")[2]
            msg = f"unknown {section} setting" if section else "unknown setting"
        elif err["type"] != "value_error" and not isinstance(err.get("input"), (dict, list)):
            msg += f", got {err.get('input')!r}"
        if f"{path}: {msg}" not in lines:
            lines.append(f"{path}: {msg}")
    return "; ".join(lines)
