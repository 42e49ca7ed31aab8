"""The shapes-24 data, tokenizer, judge and training script (CI-sized: nothing here trains a real model)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lineray.kernels.sampling import SamplingConfig
from lineray.models import shapes
from lineray.models.bundles import bundle_module
from lineray.models.checkpoint import load_checkpoint
from lineray.models.generate import Condition, generate_tokens
from lineray.models.patch_tokenizer import PatchTokenizer
from lineray.models.shapes.data import (BAND, CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, SIZES, SceneBatches, copy_iou,
                                        draw, heldout_scenes, inside, make_scenes)
from lineray.models.shapes.judge import ShapeJudge, train_judge
from lineray.models.shapes.train import STATE_FILE, TrainConfig, train
from lineray.models.transformer import Transformer

TINY = {"n_layer": 1, "dim": 32, "n_head": 2}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 64-code tokenizer fitted on 120 scenes (the bundle fits on 1,000: same recipe, smaller)."""
    scenes = make_scenes(120, seed=3, labels=torch.randint(NUM_CLASSES, (120,), generator=torch.Generator().manual_seed(0)))
    tok = PatchTokenizer.fit(scenes.images, 64, seed=0, patch=4, max_patches=40_000)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.safetensors"
    tok.save(path)
    return path


def test_scenes_are_deterministic_and_seeded():
    a, b, c = make_scenes(20, seed=5), make_scenes(20, seed=5), make_scenes(20, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.sizes, b.sizes) and torch.equal(a.centers, b.centers)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 1, IMAGE_SIZE, IMAGE_SIZE) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.labels.tolist() == [i % 10 for i in range(20)]
    x1, y1 = next(SceneBatches(4, seed=2))
    x2, y2 = next(SceneBatches(4, seed=2))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # A resumed stream draws what the uninterrupted one draws at that step.
    stream = SceneBatches(4, seed=2)
    next(stream)
    assert torch.equal(next(stream)[0], next(SceneBatches(4, seed=2, step=1))[0])


def _read_attributes(band: torch.Tensor):
    """(centre column, half-width) of the ink in a [32, 96] band, read from the pixels alone."""
    ink = (band > 0.5).float()
    cols = ink.sum(0).nonzero().flatten()
    weights = ink.sum(0)
    centre = float((weights * torch.arange(IMAGE_SIZE)).sum() / weights.sum()) + 0.5
    return centre, (cols.max() - cols.min() + 1).item() / 2


def test_labels_and_attributes_read_back_from_the_pixels():
    """Every class is told apart by matching the top band against all ten shapes at the read-back
    position: the best match is the label, and by a wide margin (the classes are exact)."""
    scenes = make_scenes(60, seed=11)
    for i in range(len(scenes)):
        top = scenes.images[i, 0, :BAND]
        centre, half_width = _read_attributes(top)
        assert abs(centre - scenes.centers[i].item()) < 0.75  # every shape is symmetric about its centre column
        assert half_width <= scenes.sizes[i].item() + 0.5
        ious = []
        for cls in range(NUM_CLASSES):
            drawn = draw(torch.tensor([cls]), scenes.sizes[i:i + 1], scenes.centers[i:i + 1], torch.tensor([0]),
                         torch.tensor([0]), torch.tensor([0]))[0, 0, :BAND] > 0.5
            mine = top > 0.5
            ious.append(float((drawn & mine).sum() / (drawn | mine).sum()))
        best = max(range(NUM_CLASSES), key=ious.__getitem__)
        assert best == scenes.labels[i].item() and ious[best] == 1.0
        assert sorted(ious)[-2] < 0.85, f"{CLASS_NAMES[best]} is too close to another class: {ious}"


def test_bottom_band_copies_the_top_and_copy_iou_sees_it():
    scenes = make_scenes(30, seed=1)
    assert torch.equal(scenes.images[:, :, :BAND], scenes.images[:, :, 2 * BAND:])
    middle = scenes.images[:, :, BAND:2 * BAND]
    assert (middle > 0.5).sum() == 0 and (middle == 0).any()  # only the grey bar in the middle
    assert torch.all(copy_iou(scenes.images) == 1)
    # Move the bottom shape by one patch, or draw another shape there: the IoU drops.
    moved = scenes.images.clone()
    moved[:, :, 2 * BAND:] = torch.roll(moved[:, :, 2 * BAND:], 4, dims=-1)
    assert torch.all(copy_iou(moved) < 0.9)
    other = scenes.images.clone()
    other[:, :, 2 * BAND:] = scenes.images[torch.arange(30).roll(1), :, :BAND]
    assert copy_iou(other).mean() < 0.5
    assert copy_iou(torch.full((2, 3, 96, 96), -1.0)).tolist() == [0.0, 0.0]


def test_shapes_are_inside_their_box():
    u = torch.linspace(-1.5, 1.5, 61).view(1, -1)
    v = torch.linspace(-1.5, 1.5, 61).view(-1, 1)
    for cls in range(NUM_CLASSES):
        mask = inside(cls, u.expand(61, 61), v.expand(61, 61))
        assert mask.any() and not mask[(u.abs() > 1.0).expand(61, 61) | (v.abs() > 1.0).expand(61, 61)].any()
    assert min(SIZES) * 2 >= 16 and max(SIZES) * 2 + 4 <= BAND


def test_tokenizer_round_trip_psnr_and_copied_tokens(tokenizer):
    tok = PatchTokenizer.load(tokenizer)
    assert (tok.codebook_size, tok.patch) == (64, 4)
    held = heldout_scenes(100)
    recon = tok.reconstruction_error(held.images)
    assert recon["psnr_db"] > 27  # measured 30.9 dB for the bundle's tokenizer, ~30 for this smaller fit
    codes = tok.encode(held.images)
    assert codes.shape == (100, 24, 24)
    # Patch-aligned copies: the bottom band's tokens are the top band's, so copying is exact in token space.
    assert torch.equal(codes[:, :8], codes[:, 16:])
    assert torch.equal(tok.encode(tok.decode_codes(codes)), codes)
    assert torch.all(copy_iou(tok.decode_codes(codes)) == 1)


def test_bundle_registry_names_shapes():
    b = bundle_module("shapes-24")
    assert b is shapes and b.CLASS_NAMES == CLASS_NAMES and len(CLASS_NAMES) >= 10
    with pytest.raises(ValueError, match="unknown bundled model 'nope'"):
        bundle_module("nope")
    images, labels = shapes.heldout_images(7)
    assert images.shape == (7, 1, 96, 96) and labels.tolist() == list(range(7))


def test_judge_trains_and_reads_the_class(tmp_path, tokenizer):
    """A short run (CI-sized) already separates the shapes well above chance on held-out scenes."""
    torch.manual_seed(0)
    info = train_judge(tmp_path, tokenizer, steps=30, batch_size=32, log_every=10)
    assert info["heldout_accuracy"] > 0.3  # chance is 0.1
    judge = ShapeJudge.load(tmp_path / "judge.safetensors")
    predicted, features = judge.predict(heldout_scenes(20).images)
    assert predicted.shape == (20,) and features.shape == (20, 128)
    assert json.loads((tmp_path / "judge.json").read_text())["heldout_accuracy_tokenized"] > 0.3


def _tiny(out, tokenizer, **kw):
    return TrainConfig(out=out, steps=4, batch_size=2, warmup_steps=2, eval_every=4, heldout=4, log_every=1,
                       autocast="off", threads=1, model_overrides=TINY, tokenizer=tokenizer, **kw)


def test_training_runs_writes_a_loadable_model_and_resumes_exactly(tmp_path, tokenizer):
    info = train(_tiny(tmp_path / "straight", tokenizer))
    assert info["steps"] == 4 and info["heldout_nll"] > 0
    record = json.loads((tmp_path / "straight" / shapes.GPT_JSON).read_text())
    assert record["config"]["grid_size"] == 24 and record["config"]["vocab_size"] == 64
    model = Transformer(shapes.model_config(tmp_path / "straight" / shapes.GPT_JSON))
    load_checkpoint(model, tmp_path / "straight" / shapes.GPT_FILE)
    gen = generate_tokens(model.eval(), Condition.classes([4]), [0], sampling=SamplingConfig(cfg_scale=2.0))
    assert gen.tokens.shape == (1, 576)

    # Killed after 2 steps (the session ends), then the same command again: equal to the straight run.
    stopped = train(_tiny(tmp_path / "resumed", tokenizer, session_steps=2))
    assert stopped == {"steps": 2, "stopped": True, "train_seconds": stopped["train_seconds"]}
    assert (tmp_path / "resumed" / STATE_FILE).is_file()
    assert train(_tiny(tmp_path / "resumed", tokenizer))["steps"] == 4
    a = load_file(str(tmp_path / "straight" / shapes.GPT_FILE))
    b = load_file(str(tmp_path / "resumed" / shapes.GPT_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run started again does nothing and reports what it recorded; with more steps it trains on.
    assert train(_tiny(tmp_path / "resumed", tokenizer))["steps"] == 4
    more = _tiny(tmp_path / "resumed", tokenizer)
    more.steps = 6
    assert train(more)["steps"] == 6
    c = load_file(str(tmp_path / "resumed" / shapes.GPT_FILE))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path, tokenizer):
    train(_tiny(tmp_path, tokenizer, session_steps=1))
    with pytest.raises(SystemExit, match="other settings"):
        train(TrainConfig(out=tmp_path, steps=4, batch_size=3, warmup_steps=2, heldout=4, autocast="off",
                          threads=1, model_overrides=TINY, tokenizer=tokenizer))


def test_tokenizer_with_the_wrong_patch_is_refused(tmp_path):
    PatchTokenizer(torch.zeros(64, 4), patch=2).save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="4x4"):
        train(_tiny(tmp_path / "run", tmp_path / "t.safetensors"))
