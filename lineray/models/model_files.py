"""The JSON record that travels with a bundled model's weights: its GPTConfig, sampling settings, training."""
from __future__ import annotations

import json
from pathlib import Path

from lineray.kernels.sampling import SamplingConfig
from lineray.models.config import GPTConfig


def read_model_json(path: str | Path, train_command: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        how = f"train one with `{train_command} --out DIR`" if train_command else "this model's weights are not here"
        raise FileNotFoundError(f"model description not found: {path} ({how})")
    info = json.loads(path.read_text())
    if "config" not in info:
        raise ValueError(f"{path}: no 'config' entry (the GPTConfig of the weights)")
    return info


def model_config(path: str | Path, train_command: str | None = None) -> GPTConfig:
    return GPTConfig(**read_model_json(path, train_command)["config"])


def model_sampling(path: str | Path) -> SamplingConfig:
    """The sampling settings stored with the model (tuned for judge accuracy), or the defaults."""
    return SamplingConfig(**read_model_json(path).get("sampling", {}))
