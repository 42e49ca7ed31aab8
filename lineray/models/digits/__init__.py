"""The small real model lineray ships: a class-conditional LlamaGen GPT trained on scikit-learn's digits.

Files live in lineray/assets/digits (safetensors + JSON, a few MB):
  gpt.safetensors / gpt.json   the GPT weights; its GPTConfig, tuned sampling settings, training record
  tokenizer.safetensors        the 2x2-patch k-means codebook (16x16 tokens <-> 32x32 pixels)
  judge.safetensors / .json    the judge CNN used by `lineray eval`
Rebuild them with `python -m lineray.models.digits.train` and `python -m lineray.models.digits.judge`.
"""
from __future__ import annotations

from pathlib import Path

from lineray.kernels.sampling import SamplingConfig
from lineray.models import model_files
from lineray.models.config import GPTConfig
from lineray.models.patch_tokenizer import PatchTokenizer

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "digits"
BUNDLED_GPT = ASSET_DIR / "gpt.safetensors"
BUNDLED_JSON = ASSET_DIR / "gpt.json"
BUNDLED_TOKENIZER = ASSET_DIR / "tokenizer.safetensors"
BUNDLED_JUDGE = ASSET_DIR / "judge.safetensors"

CLASS_NAMES = [str(d) for d in range(10)]  # class label d is the digit d

GPT_FILE, GPT_JSON, TOKENIZER_FILE, JUDGE_FILE = "gpt.safetensors", "gpt.json", "tokenizer.safetensors", "judge.safetensors"


# One reader for every bundle's gpt.json (a path argument serves training outputs too).
model_config, model_sampling, read_model_json = (model_files.model_config, model_files.model_sampling,
                                                 model_files.read_model_json)


def bundled_config() -> GPTConfig:
    return model_files.model_config(BUNDLED_JSON, f"python -m {__name__}.train")


def bundled_sampling() -> SamplingConfig:
    return model_sampling(BUNDLED_JSON)


def load_bundled_tokenizer() -> PatchTokenizer:
    return PatchTokenizer.load(BUNDLED_TOKENIZER)


def load_bundled_judge(path: str | Path = BUNDLED_JUDGE):
    from lineray.models.digits.judge import DigitJudge
    return DigitJudge.load(path)


def heldout_images(n: int | None = None):
    """(images [M, 1, 32, 32], labels [M]): the first n (default all 360) held-out real digits."""
    from lineray.models.digits.data import load_digits_split, render
    _, held = load_digits_split()
    if n is not None:
        held = held.select(slice(0, n))
    return render(held.images), held.labels


def reference_images():
    """Every real digit (training and held-out split): the reference of the judge-feature Frechet distance."""
    import torch

    from lineray.models.digits.data import load_digits_split, render
    train, held = load_digits_split()
    return torch.cat([render(train.images), render(held.images)])


__all__ = ["ASSET_DIR", "CLASS_NAMES", "BUNDLED_GPT", "BUNDLED_JSON", "BUNDLED_TOKENIZER", "BUNDLED_JUDGE", "PatchTokenizer",
           "bundled_config", "bundled_sampling", "load_bundled_tokenizer", "load_bundled_judge",
           "heldout_images", "reference_images",
           "model_config", "model_sampling", "read_model_json"]
