"""The bundled shapes-24 model (lineray/assets/shapes): it loads, draws the asked shape and copies it 16 lines down.

Committed together with the weights (CI never trains)."""
import json
import math

import torch

from lineray.models import shapes
from lineray.models.bundles import bundle_module
from lineray.models.checkpoint import load_checkpoint
from lineray.models.generate import Condition, generate_tokens
from lineray.models.transformer import Transformer
from lineray.models.shapes.data import copy_iou, heldout_scenes

SAMPLES = 50


def measured_check() -> dict:
    """What `python -m lineray.quality.tune --model shapes-24 --shipped --samples 1000 --write` measured."""
    return json.loads(shapes.BUNDLED_JSON.read_text())["sampling_check"]


def bundled_model() -> Transformer:
    model = Transformer(shapes.bundled_config())
    load_checkpoint(model, shapes.BUNDLED_GPT)
    return model.eval()


def test_bundled_files_are_small_safetensors_and_json():
    files = [shapes.BUNDLED_GPT, shapes.BUNDLED_JSON, shapes.BUNDLED_TOKENIZER, shapes.BUNDLED_JUDGE]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in shapes.ASSET_DIR.iterdir()) < 16 * 2**20
    cfg = shapes.bundled_config()
    assert (cfg.grid_size, cfg.num_classes, cfg.cls_token_num, cfg.model_type) == (24, 10, 1, "c2i")
    assert cfg.vocab_size == shapes.load_bundled_tokenizer().codebook_size
    assert shapes.bundled_sampling().uses_cfg
    check = measured_check()
    assert check["samples"] >= 1000 and check["accuracy"] >= 0.80  # the bar, on the shipped settings
    assert bundle_module("shapes-24") is shapes


def test_bundled_judge_recognises_heldout_scenes():
    held = heldout_scenes(200)
    predicted, features = shapes.load_bundled_judge().predict(held.images)
    assert (predicted == held.labels).float().mean() > 0.98
    assert features.shape == (200, 128)


def test_bundle_samples_the_asked_shapes_and_copies_them():
    """50 full-cache samples with the shipped settings: the judge names the class, the bottom band copies the top."""
    model, tok, judge = bundled_model(), shapes.load_bundled_tokenizer(), shapes.load_bundled_judge()
    labels = torch.arange(SAMPLES) % 10
    gen = generate_tokens(model, Condition.classes(labels), [200_000 + i for i in range(SAMPLES)],
                          sampling=shapes.bundled_sampling())
    images = tok.decode_codes(gen.tokens.view(SAMPLES, 24, 24))
    assert images.shape == (SAMPLES, 3, 96, 96)
    predicted, _ = judge.predict(images)
    # Floor: the 1,000-sample accuracy minus 3 standard errors of a 50-sample mean (fails ~1 run in 700).
    p = measured_check()["accuracy"]
    assert (predicted == labels).float().mean() >= p - 3 * math.sqrt(p * (1 - p) / SAMPLES)
    assert copy_iou(images).mean() >= measured_check()["copy_iou"] - 0.15
