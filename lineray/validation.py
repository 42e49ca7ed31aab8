"""Validation of the config records (ModelSpec, CacheSpec, SamplingConfig, JobConfig) with pydantic v2.

The records are frozen pydantic dataclasses with STRICT: unknown keys are errors, and no value
is coerced across types (a quoted "no" is not False, "8" is not 8). Python code builds them
directly; YAML and command-line data (plain dicts) go through `from_data`, which validates in
pydantic's JSON mode: the only place where nested sections may be given as mappings, and where
an int stands for a float. Errors name the field path: `cache.rho must be ..., got ...`.

A leaf module (no lineray imports), so every floor may use it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

STRICT = ConfigDict(extra="forbid", strict=True)

T = TypeVar("T")

# pydantic error type -> what the value must be ({ctx} filled from the error)
MUST_BE = {
    "int_type": "a whole number", "int_from_float": "a whole number", "float_type": "a number",
    "bool_type": "true or false", "string_type": "text", "dict_type": "a mapping", "list_type": "a list",
    "greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}", "less_than": "< {lt}",
    "literal_error": "{expected}", "finite_number": "a finite number", "string_too_short": "non-empty text",
}


def from_data(cls: type[T], data: dict | None, error: type[Exception] = ValueError, where: str = "",
              what: str = "") -> T:
    """`cls` from plain data (YAML, flags); `error` naming every bad field path when it does not fit.

    where: the path of this section in a larger config ("cache"); what: its name in messages ("job")."""
    try:
        text = json.dumps(data if data is not None else {}, default=_plain)
    except (TypeError, ValueError) as e:  # values JSON has no type for
        raise error(f"{where or 'settings'}: {e}") from None
    try:
        return TypeAdapter(cls).validate_json(text)
    except ValidationError as e:
        raise error(describe(e, where, what)) from None


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a nested record given as an instance
        return dataclasses.asdict(value)
    return str(value)  # YAML dates and the like: text


def describe(e: ValidationError, where: str = "", what: str = "") -> str:
    """One clause per field path: `batch_size must be a whole number or 'auto', got 'lots'`."""
    by_path: dict[str, list[dict]] = {}
    for err in e.errors():
        # union members and validators add loc parts that are not field names
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p or p in ("int", "float", "str")))]
        by_path.setdefault(".".join(filter(None, [where, *loc])), []).append(err)
    clauses = []
    for path, errs in by_path.items():
        first = errs[0]
        if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            section = path.rpartition(".")[0].rpartition(".")[2] or what
            clauses.append(f"{path}: unknown {section + ' ' if section else ''}setting")
        elif first["type"] == "missing" or first["type"] == "missing_argument":
            clauses.append(f"{path} is required")
        elif all(err["type"] in MUST_BE for err in errs):
            wanted = " or ".join(dict.fromkeys(_must_be(err) for err in errs))
            clauses.append(f"{path} must be {wanted}, got {first.get('input')!r}")
        else:
            msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in errs)
            name = path.rpartition(".")[2]
            if name and msg.startswith(name + " "):  # "rho must be ..." under cache.rho
                clauses.append(f"{path}{msg[len(name):]}")
            else:
                clauses.append(f"{path}: {msg}" if path else msg)
    return "; ".join(clauses)


def _must_be(err: dict) -> str:
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in err.get("ctx", {}).items()}
    text = MUST_BE[err["type"]].format(**ctx)
    if err["type"].startswith(("greater", "less")) and all(type(v) is int for v in err.get("ctx", {}).values()):
        text = f"a whole number {text}"  # an int limit: the field is a whole number (float fields have float limits)
    return text
