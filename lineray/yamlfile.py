"""Reading YAML config files with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import yaml


def load_mapping(path: str | Path, error: type[Exception] = ValueError, what: str = "config file") -> dict:
    """The top-level mapping of a YAML file; `error` with the file's name when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{p}: expected a mapping at the top level")
    return data
