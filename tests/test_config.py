"""The config records: an unambiguous ModelSpec, CacheSpec from Python and YAML, strict validation."""
from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from lineray.cache import CacheConfigError, CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.spec import ModelSpec


# -- ModelSpec: the bundle only when asked for, random weights only when asked for ----------------
def test_default_and_named_bundle_are_the_digits_model():
    from lineray.models.digits import bundled_config, bundled_sampling
    for spec in (ModelSpec(), ModelSpec(preset="digits")):
        assert spec.is_bundled and spec.config() == bundled_config()
        assert spec.default_sampling() == bundled_sampling()
        assert spec.name == "digits (bundled)"


@pytest.mark.parametrize("kw,missing", [
    (dict(preset="GPT-B"), "checkpoint: PATH (or checkpoint: random) and decoder: PATH"),
    (dict(preset="GPT-B", checkpoint="/ckpt/c2i_B_256.pt"), "decoder: PATH (or decoder: random)"),
    (dict(preset="GPT-B", decoder="random"), "checkpoint: PATH (or checkpoint: random)"),
])
def test_a_preset_without_weights_is_an_error_that_says_which(kw, missing):
    """Before: ModelSpec(preset="GPT-B") silently ran the bundled digits model."""
    with pytest.raises(ValidationError, match=r"preset GPT-B is a shape without weights: it needs " + missing.replace("(", r"\(").replace(")", r"\)")):
        ModelSpec(**kw)


def test_random_weights_only_when_asked_for():
    spec = ModelSpec(preset="GPT-B", checkpoint="random", decoder="random", grid_size=24)
    assert not spec.is_bundled and spec.checkpoint_path() is None
    assert spec.config().n_layer == 12 and spec.config().grid_size == 24
    assert spec.name == "GPT-B (random weights, seed 0)"
    assert spec.default_sampling() == SamplingConfig(cfg_scale=4.0, temperature=1.0, top_k=2000, top_p=1.0)
    path = ModelSpec(preset="GPT-B", checkpoint="~/c2i_B_256.pt", decoder="random").checkpoint_path()
    assert path.name == "c2i_B_256.pt" and "~" not in str(path)


@pytest.mark.parametrize("kw,message", [
    (dict(preset="GPT-Q"), "unknown model preset 'GPT-Q'; bundled models: digits"),
    (dict(checkpoint="bundled"), "the bundled model is chosen by name"),
    (dict(preset="digits", grid_size=24), "has a fixed shape"),
    (dict(preset="GPT-B", checkpoint="random", decoder="random", ema="no"), "ema"),
    (dict(preset="GPT-B", checkpoint="random", decoder="random", dtype="fp64"), "dtype"),
    (dict(presett="GPT-B"), "presett"),
])
def test_bad_model_settings_are_named(kw, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**kw)


def test_specs_are_small_and_picklable():
    for spec in (ModelSpec(preset="GPT-B", checkpoint="random", decoder="random"), CacheSpec("linear", rho="1/6"),
                 SamplingConfig(cfg_scale=2.0)):
        blob = pickle.dumps(spec)
        assert pickle.loads(blob) == spec and len(blob) < 600


# -- CacheSpec: rho as a fraction from Python, echoed as written ----------------------------------
def test_cache_spec_takes_a_fraction_from_python():
    """Before: CacheSpec(rho="1/6") raised a raw TypeError (only YAML and flags parsed fractions)."""
    spec = CacheSpec("linear", rho="1/6")
    assert spec == CacheSpec.from_dict({"policy": "linear", "rho": "1/6"}) == CacheSpec("linear", rho=1 / 6)
    assert spec.plan(24, 24).budget == 96
    with pytest.raises(ValidationError, match="fraction like 1/6"):
        CacheSpec("linear", rho="a sixth")
    with pytest.raises(CacheConfigError, match="cache.ratio: unknown cache setting"):
        CacheSpec.from_dict({"policy": "linear", "ratio": 0.2})


@pytest.mark.parametrize("rho,shown", [("7/6", "7/6"), ("5/4", "1.25"), (1.5, "1.5"), ("0", "0")])
def test_a_bad_rho_is_echoed_as_written(rho, shown):
    """Before: --rho 7/6 was echoed as 1.16667."""
    with pytest.raises(CacheConfigError, match=rf"rho must be in \(0, 1\], got {shown}$"):
        CacheSpec("linear", rho=rho).plan(24, 24)


def test_strict_types():
    with pytest.raises(ValidationError, match="head_aggregate"):
        CacheSpec("linear", rho=0.5, head_aggregate="no")  # a quoted "no" is not False
    with pytest.raises(ValidationError, match="top_k"):
        SamplingConfig(top_k="8")
    with pytest.raises(ValidationError, match="cfg_scale must be >= 1.0"):
        SamplingConfig(cfg_scale=0.5)
