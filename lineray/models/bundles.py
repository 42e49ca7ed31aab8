"""The small real models that ship inside lineray, by name (`--model digits`, `model: {preset: digits}`).

Each bundle is a module under lineray/models/ whose files live in lineray/assets/<name>/ and which
exposes the same small surface:
  BUNDLED_GPT                 path of the GPT weights (safetensors)
  bundled_config()            its GPTConfig
  bundled_sampling()          the sampling settings shipped with it
  load_bundled_tokenizer()    its image tokenizer / decoder (codes [B, h, w] -> images [B, 3, H, W])
  load_bundled_judge(path)    the judge classifier `lineray eval` uses (default: the bundled file)
  CLASS_NAMES                 one name per class label
and, for `lineray eval --model NAME`:
  ASSET_DIR, GPT_FILE, GPT_JSON, TOKENIZER_FILE   where the files are (a training output has the same names)
  model_config(json), model_sampling(json)        read a gpt.json
  PatchTokenizer                                  the tokenizer class
  heldout_images(n)           (images, labels) of real held-out data for teacher forcing
  reference_images()          real images whose judge features are the Frechet distance's reference
  copy_iou(images)            optional: per-image long-range copy fidelity (shapes-24)
"""
from __future__ import annotations

import importlib
from types import ModuleType

BUNDLES: dict[str, str] = {
    "digits": "lineray.models.digits",
    "shapes-24": "lineray.models.shapes",
}


def bundle_module(name: str) -> ModuleType:
    if name not in BUNDLES:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLES)}")
    return importlib.import_module(BUNDLES[name])


def shipped(name: str) -> bool:
    """The bundle's weights are in this copy of lineray (a bundle may be registered before it is trained)."""
    return bundle_module(name).BUNDLED_GPT.is_file()
