"""The config records: an unambiguous ModelSpec, CacheSpec from Python and YAML, strict validation."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from lineray.cache import CacheConfigError, CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent


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


# -- one schema for YAML, flags and Python ------------------------------------------------------------
def _job_file(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text("source: bundled\noutput: out\n" + text)
    return path


@pytest.mark.parametrize("text,message", [
    ('verify: "no"\n', "verify must be true or false, got 'no'"),  # a quoted "no" is not False (nor True)
    ("replicsa: 2\n", "replicsa: unknown job setting"),
    ("cache: {polcy: linear}\n", "cache.polcy: unknown cache setting"),
    ("device: cdua\n", "device must be cpu, cuda or cuda:N, got 'cdua'"),
    ("model: {preset: GPT-B}\n", "model: preset GPT-B is a shape without weights"),
    ("replicas: '2'\n", "replicas must be a whole number, got '2'"),
    ("resources: {decoders: 0}\n", "resources.decoders must be a whole number >= 1, got 0"),
    ("tp: 3\n", "tp: tp=3 does not fit digits"),
    ("cache: {policy: linear, rho: 7/6}\n", r"cache: rho must be in \(0, 1\], got 7/6"),
])
def test_job_file_errors_name_the_field(tmp_path, text, message):
    from lineray.pipelines import JobConfig, JobConfigError
    with pytest.raises(JobConfigError, match=message):
        JobConfig.from_yaml(_job_file(tmp_path, text))


def test_unquoted_yaml_booleans_still_work(tmp_path):
    from lineray.pipelines import JobConfig
    assert JobConfig.from_yaml(_job_file(tmp_path, "verify: no\ncompile: yes\n")).compile is True


def test_yaml_flags_and_python_build_the_same_job(tmp_path):
    from lineray import cli
    from lineray.pipelines import JobConfig

    path = _job_file(tmp_path, "model: {preset: GPT-tiny, checkpoint: random, decoder: random, grid_size: 8}\n")
    from_yaml = JobConfig.from_yaml(path, {"cache.policy": "linear", "cache.rho": "1/4", "sampling.top_k": 5,
                                           "replicas": 2})
    args = cli.build_parser().parse_args(["generate", str(path), "--cache", "linear", "--rho", "1/4", "--top-k", "5",
                                          "--replicas", "2"])
    from_flags = cli.job_from_args(args)
    model = ModelSpec(preset="GPT-tiny", checkpoint="random", decoder="random", grid_size=8)
    from_python = JobConfig(source="bundled", output="out", model=model, cache=CacheSpec("linear", rho="1/4"),
                            sampling=SamplingConfig(**{**model.default_sampling().__dict__, "top_k": 5}), replicas=2)
    assert from_yaml == from_flags == from_python
    assert pickle.loads(pickle.dumps(from_python)) == from_python
    assert JobConfig.from_dict(from_python.to_dict()) == from_python  # what submit uploads reads back the same


def test_a_bad_device_fails_before_ray_starts(tmp_path, capsys):
    import ray

    from lineray import cli
    path = _job_file(tmp_path, "device: cdua\n")
    assert cli.main(["generate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == ("lineray: error: device must be cpu, cuda or cuda:N, got 'cdua'")
    assert not ray.is_initialized()


# -- the command line -----------------------------------------------------------------------------
def test_version_and_help_for_every_flag(capsys):
    import argparse

    import lineray
    from lineray import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lineray {lineray.__version__}"
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(cli.COMMANDS)
    for name, command in sub.choices.items():
        bare = [a.dest for a in command._actions if not a.help and not isinstance(a, argparse._HelpAction)]
        assert not bare, f"lineray {name}: flags without help: {bare}"


def test_sample_checks_classes_and_device_before_the_model_loads():
    from lineray.api import resolve_device, sample
    from lineray.models.generate import GenerationError

    unloadable = ModelSpec(preset="GPT-tiny", checkpoint="/no/such/weights.pt", decoder="random")
    with pytest.raises(GenerationError, match="class id 10 is out of range: this model has 10 classes"):
        sample([3, 10], model=unloadable, device="cpu")  # not "checkpoint not found": nothing was loaded
    with pytest.raises(GenerationError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        sample([3], model=unloadable, device="gpu")
    import torch
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(GenerationError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("model", sorted(p.name for p in (REPO / "configs" / "models").glob("*.yaml")))
def test_shipped_model_and_cache_presets_validate(model):
    """`lineray sample --config configs/models/X.yaml --config configs/cache/Y.yaml` (no weights are read)."""
    from lineray import cli
    for cache in sorted((REPO / "configs" / "cache").glob("*.yaml")):
        args = cli.build_parser().parse_args(["sample", "--config", str(REPO / "configs" / "models" / model),
                                              "--config", str(cache)])
        spec, cache_spec, sampling = cli.sample_settings(args)
        assert not spec.is_bundled and spec.checkpoint.startswith("checkpoints/")
        if spec.is_folder_family:  # its config.json is in the (absent) folder: the preset's shape stands in
            spec = spec.replace(checkpoint="random")
        cfg = spec.config()
        cache_spec.plan(cfg.grid_size, cfg.grid_size, cfg.image_tokens)


def test_sample_flags_over_yaml_sections(tmp_path):
    from lineray import cli
    path = tmp_path / "m.yaml"
    path.write_text("model: {preset: GPT-tiny, checkpoint: random, decoder: random}\nsampling: {top_k: 7}\n")
    args = cli.build_parser().parse_args(["sample", "--config", str(path), "--cache", "linear", "--cfg-scale", "3",
                                          "--set", "model.grid_size=8"])
    spec, cache, sampling = cli.sample_settings(args)
    assert (spec.grid_size, cache.policy, cache.rho, sampling.cfg_scale, sampling.top_k) == (8, "linear", 1 / 6, 3.0, 7)
    path.write_text("model: {preset: GPT-tiny}\nreplicas: 2\n")
    with pytest.raises(ValueError, match="replicas: unknown section"):
        cli.sample_settings(cli.build_parser().parse_args(["sample", "--config", str(path)]))
