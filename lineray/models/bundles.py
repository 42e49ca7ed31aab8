"""The small real models that ship inside lineray, by name (`--model digits`, `model: {preset: digits}`).

Each bundle is a module under lineray/models/ whose files live in lineray/assets/<name>/ and which
exposes the same small surface:
  BUNDLED_GPT                 path of the GPT weights (safetensors)
  bundled_config()            its GPTConfig
  bundled_sampling()          the sampling settings shipped with it
  load_bundled_tokenizer()    its image tokenizer / decoder (codes [B, h, w] -> images [B, 3, H, W])
  load_bundled_judge()        the judge classifier `lineray eval` uses
  CLASS_NAMES                 one name per class label
"""
from __future__ import annotations

import importlib
from types import ModuleType

BUNDLES: dict[str, str] = {
    "digits": "lineray.models.digits",
}


def bundle_module(name: str) -> ModuleType:
    if name not in BUNDLES:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLES)}")
    return importlib.import_module(BUNDLES[name])
