"""The bundled digits model: it loads and draws digits; its tokenizer, judge and training script work."""
import json

import pytest
import torch

from lineray.kernels.sampling import SamplingConfig
from lineray.models import digits
from lineray.models.checkpoint import load_checkpoint
from lineray.models.config import preset
from lineray.models.digits.data import Augment, AugmentedBatches, load_digits_split, render
from lineray.models.digits.tokenizer import PatchTokenizer
from lineray.models.digits.train import TrainConfig, train, use_bf16
from lineray.models.generate import Condition, generate_tokens
from lineray.models.spec import ModelSpec
from lineray.models.transformer import Transformer

TINY = {"n_layer": 1, "dim": 32, "n_head": 2}


def test_bundled_files_are_small_safetensors_and_json():
    files = [digits.BUNDLED_GPT, digits.BUNDLED_JSON, digits.BUNDLED_TOKENIZER, digits.BUNDLED_JUDGE]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in digits.ASSET_DIR.iterdir()) < 8 * 2**20
    cfg = digits.bundled_config()
    assert cfg == preset("GPT-digits", vocab_size=cfg.vocab_size, grid_size=16)
    assert (cfg.grid_size, cfg.num_classes, cfg.cls_token_num, cfg.model_type) == (16, 10, 1, "c2i")
    assert cfg.vocab_size == digits.load_bundled_tokenizer().codebook_size
    assert digits.bundled_sampling().uses_cfg


def test_default_model_spec_loads_the_bundled_model_and_generates_digit_images():
    spec = ModelSpec()
    model, decoder = spec.build_model(), spec.build_decoder()
    gen = generate_tokens(model, Condition.classes([3, 7]), [0, 1], sampling=digits.bundled_sampling())
    images = decoder.decode_codes(gen.tokens.view(2, 16, 16))
    assert images.shape == (2, 3, 32, 32) == (2, 3, decoder.image_size(16), decoder.image_size(16))
    assert images.min() >= -1 and images.max() <= 1
    # Digits are ink on a dark background: most pixels are background, some are ink.
    ink = (images > 0).float().mean()
    assert 0.05 < ink < 0.6
    judge = digits.load_bundled_judge()
    predicted, _ = judge.predict(images)
    assert predicted.shape == (2,)


def test_tokenizer_round_trip_and_reconstruction():
    tok = digits.load_bundled_tokenizer()
    codes = torch.randint(tok.codebook_size, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok.encode(tok.decode_codes(codes)), codes)  # each entry is its own nearest code
    _, held = load_digits_split()
    recon = tok.reconstruction_error(render(held.images))
    assert recon["psnr_db"] > 24  # measured 26.0 dB with 16 codes
    with pytest.raises(ValueError, match="out of range"):
        tok.decode_codes(torch.full((1, 2, 2), tok.codebook_size))


def test_tokenizer_fit_save_load(tmp_path):
    train_set, _ = load_digits_split()
    images = render(train_set.images[:40], Augment(), torch.Generator().manual_seed(0))
    tok = PatchTokenizer.fit(images, 8, seed=0)
    assert tok.codebook.shape == (8, 4)
    assert torch.all(tok.codebook.mean(1).diff() >= 0)  # codes sorted by brightness, 0 = background
    tok.save(tmp_path / "t.safetensors")
    assert torch.equal(PatchTokenizer.load(tmp_path / "t.safetensors").codebook, tok.codebook)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        PatchTokenizer.load(tmp_path / "missing.safetensors")


def test_bundled_judge_recognises_real_heldout_digits():
    _, held = load_digits_split()
    predicted, features = digits.load_bundled_judge().predict(render(held.images))
    assert (predicted == held.labels).float().mean() > 0.95
    assert features.shape == (len(held), 128)


def test_augmented_batches_are_seeded():
    train_set, _ = load_digits_split()
    a, la = next(AugmentedBatches(train_set, 4, seed=5))
    b, lb = next(AugmentedBatches(train_set, 4, seed=5))
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (4, 1, 32, 32)
    assert a.min() >= -1 and a.max() <= 1


def _tiny_run(out, seed=0, **kw):
    cfg = TrainConfig(out=out, seed=seed, steps=2, batch_size=4, warmup_steps=2, eval_every=2, log_every=1,
                      model_overrides=TINY, tokenizer=digits.BUNDLED_TOKENIZER, **kw)
    return train(cfg)


def test_two_step_training_run_writes_a_loadable_deterministic_model(tmp_path):
    info = _tiny_run(tmp_path / "a")
    assert info["steps"] == 2 and info["heldout_nll"] > 0
    for name in (digits.GPT_FILE, digits.GPT_JSON, digits.TOKENIZER_FILE):
        assert (tmp_path / "a" / name).is_file()
    record = json.loads((tmp_path / "a" / digits.GPT_JSON).read_text())
    assert record["training"]["steps"] == 2 and record["config"]["n_layer"] == 1
    model = Transformer(digits.model_config(tmp_path / "a" / digits.GPT_JSON))
    load_checkpoint(model, tmp_path / "a" / digits.GPT_FILE)
    gen = generate_tokens(model.eval(), Condition.classes([1]), [0], sampling=SamplingConfig(cfg_scale=2.0))
    assert gen.tokens.shape == (1, 256)
    # Same seed, same weights; another seed, other weights.
    _tiny_run(tmp_path / "b")
    _tiny_run(tmp_path / "c", seed=1)
    from safetensors.torch import load_file
    a, b, c = (load_file(str(tmp_path / d / digits.GPT_FILE)) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_minutes_budget_picks_a_step_count(tmp_path):
    cfg = TrainConfig(out=tmp_path, steps=None, minutes=0.01, batch_size=2, warmup_steps=50, eval_every=1000,
                      log_every=1000, model_overrides=TINY, tokenizer=digits.BUNDLED_TOKENIZER)
    info = train(cfg)
    assert info["steps"] >= 14  # timed steps 3..13, then at least one more


def test_autocast_choice():
    assert use_bf16("bf16") and not use_bf16("off")
    assert isinstance(use_bf16("auto"), bool)
    with pytest.raises(ValueError, match="autocast must be"):
        use_bf16("fp8")
