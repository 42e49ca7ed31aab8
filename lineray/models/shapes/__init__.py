"""The second bundled model, "shapes-24": a class-conditional LlamaGen GPT at 24x24 tokens on procedural scenes.

A 96x96 scene shows one of 10 shapes in its top band, a grey bar in the middle and the same
shape again (same size, same column) in its bottom band (shapes/data.py): drawing the bottom
right needs the top, 16 token lines back, so cache policies are measured where LineAR claims
to work (24 lines, as LlamaGen at 384 px).

Files live in lineray/assets/shapes (safetensors + JSON, a few MB):
  gpt.safetensors / gpt.json   the GPT weights; its GPTConfig, tuned sampling settings, training record
  tokenizer.safetensors        the 4x4-patch k-means codebook (24x24 tokens <-> 96x96 pixels)
  judge.safetensors / .json    the judge CNN used by `lineray eval --model shapes-24`
Rebuild them with `python -m lineray.models.shapes.train` and `python -m lineray.models.shapes.judge`.
"""
from __future__ import annotations

from pathlib import Path

from lineray.kernels.sampling import SamplingConfig
from lineray.models import model_files
from lineray.models.config import GPTConfig
from lineray.models.patch_tokenizer import PatchTokenizer
from lineray.models.shapes.data import CLASS_NAMES, copy_iou

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "shapes"
GPT_FILE, GPT_JSON, TOKENIZER_FILE, JUDGE_FILE = "gpt.safetensors", "gpt.json", "tokenizer.safetensors", "judge.safetensors"
BUNDLED_GPT = ASSET_DIR / GPT_FILE
BUNDLED_JSON = ASSET_DIR / GPT_JSON
BUNDLED_TOKENIZER = ASSET_DIR / TOKENIZER_FILE
BUNDLED_JUDGE = ASSET_DIR / JUDGE_FILE

# The GPT's shape (vocab_size comes from the tokenizer): 1.9M parameters, head_dim 32 (8 RoPE pairs
# for rows, 8 for columns), sized to train in ~1.5 h on two CPU cores shared with other work.
PRESET = dict(n_layer=6, dim=160, n_head=5, num_classes=len(CLASS_NAMES), grid_size=24, multiple_of=64)


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
    from lineray.models.shapes.judge import ShapeJudge
    return ShapeJudge.load(path)


def heldout_images(n: int | None = None):
    """(images [M, 1, 96, 96], labels [M]): the first n (default 500) held-out scenes, classes cycling 0-9."""
    from lineray.models.shapes.data import heldout_scenes
    held = heldout_scenes(500 if n is None else n)
    return held.images, held.labels


def reference_images(n: int = 2000):
    """Real scenes for the judge-feature Frechet distance (their own seed: neither training nor held-out)."""
    from lineray.models.shapes.data import REFERENCE_SEED, make_scenes
    return make_scenes(n, REFERENCE_SEED).images


__all__ = ["ASSET_DIR", "CLASS_NAMES", "BUNDLED_GPT", "BUNDLED_JSON", "BUNDLED_TOKENIZER", "BUNDLED_JUDGE", "PRESET",
           "PatchTokenizer", "bundled_config", "bundled_sampling", "load_bundled_tokenizer", "load_bundled_judge",
           "heldout_images", "reference_images", "copy_iou",
           "model_config", "model_sampling", "read_model_json"]
