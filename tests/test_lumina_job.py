"""Lumina-mGPT from the front door to the sink: a downloaded-folder layout (tests/lumina_fixtures.py, the
published sharded safetensors, tokenizer.json, Meta's VQGAN files copied in) run as a job on moto S3 and
through `lineray sample`, at the preset's non-square size (lumina-tiny: 96 x 64 px)."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import jsonl_bytes, put, ray_session, read_dataset, s3, tiny_job  # noqa: F401

from lineray import cli
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.models.spec import ModelSpec
from lineray.pipelines import JobConfig, run_job
from lumina_fixtures import N_CODES, build_tiny_lumina

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_vqgan import DDCONFIG, write_meta_files
    root = tmp_path_factory.mktemp("lumina-job")
    tiny = build_tiny_lumina(root)
    write_meta_files(root, DDCONFIG, n_embed=N_CODES, embed_dim=8)  # Meta's files, copied beside the weights
    for name in ("vqgan.ckpt", "vqgan.yaml"):
        shutil.copy(root / name, tiny.lumina / name)
    return str(tiny.lumina)


def test_spec_reads_the_folder_at_the_presets_size(folder):
    spec = ModelSpec(preset="lumina-tiny", checkpoint=folder)
    cfg = spec.config()
    assert (cfg.family, cfg.grid_h, cfg.grid_width, cfg.line_tokens, cfg.image_tokens) == ("lumina", 4, 6, 7, 28)
    assert spec.default_sampling() == SamplingConfig(cfg_scale=4.0, temperature=1.0, top_k=2000)
    ids = spec.prompt_encoder().encode(["a red fox"])[0]
    assert ids[0] == cfg.bos_token_id and len(ids) < cfg.max_prefix_len
    model = spec.build_model()
    gen = generate_tokens(model, Condition.prompts([ids]), [3], sampling=spec.default_sampling())
    decoder = spec.build_decoder()
    images = decoder.decode_codes(gen.tokens.view(1, cfg.grid_h, cfg.line_tokens))
    assert images.shape == (1, 3, 64, 96)


def test_lumina_job_on_s3(ray_session, s3, folder):  # noqa: F811
    rows = [{"id": "fox", "prompt": "a red fox in snow", "seed": 5},
            {"id": "fox-again", "prompt": "a red fox in snow", "seed": 5},
            {"id": "cat", "prompt": "blue cat sits on the mat under the big sky", "count": 2},
            {"id": "empty", "prompt": ""},
            {"id": "tree", "prompt": "green tree", "cfg": 3.0}]
    source = put(s3, "prompts/lumina.jsonl", jsonl_bytes(rows))
    model = dict(preset="lumina-tiny", checkpoint=folder)
    job = JobConfig.from_dict(tiny_job(source, "s3://bucket/out/lumina", model=model, storage_options=s3.options,
                                       sampling=dict(cfg_scale=4.0, top_k=2000), shard_rows=4,
                                       cache={"policy": "linear", "rho": "1/4"}))
    summary = run_job(job, progress=False)
    assert (summary.images, summary.errors) == (5, 1)
    table = read_dataset(s3.fs(), "bucket/out/lumina")
    got = {(r["id"], r["image_index"]): r for r in table.to_pylist()}
    assert set(got) == {("fox", 0), ("fox-again", 0), ("cat", 0), ("cat", 1), ("tree", 0)}
    pixels = {k: np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))) for k, r in got.items()}
    assert {p.shape for p in pixels.values()} == {(64, 96, 3)}  # the non-square size, height x width
    assert np.array_equal(pixels[("fox", 0)], pixels[("fox-again", 0)])
    assert not np.array_equal(pixels[("fox", 0)], pixels[("tree", 0)])
    assert got[("tree", 0)]["cfg_scale"] == 3.0 and got[("fox", 0)]["prompt"] == "a red fox in snow"


def test_cli_sample(folder, tmp_path, capsys):
    code = cli.main(["sample", "--model", "lumina-tiny", "--checkpoint", folder, "--prompt", "a red fox in snow",
                     "--cache", "linear", "--rho", "1/4", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    png = tmp_path / "out" / "0000_a-red-fox-in-snow.png"
    assert Image.open(png).size == (96, 64)
    assert torch.cuda.is_available() or "wrote 1 image" in capsys.readouterr().out


def test_cli_sample_at_a_requested_size(folder, tmp_path, capsys):
    """--size 64x96 (width x height) instead of the preset's 96x64: 6 lines of 4 codes + end-of-line, the size
    tokens and the template's text say 64x96, and the PNGs are the greedy images of those prefixes."""
    from lineray.cache import CacheSpec
    from lineray.images import to_uint8
    from lineray.models.lumina.prompt import LuminaPromptEncoder
    prompts = ["a red fox in snow", "blue cat sits on the mat"]
    out = tmp_path / "out"
    code = cli.main(["sample", "--model", "lumina-tiny", "--checkpoint", folder, "--size", "64x96", "--prompt",
                     prompts[0], "--prompt", prompts[1], "--temperature", "0", "--cache", "linear", "--rho", "1/2",
                     "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pngs = sorted(out.glob("000*.png"))
    assert [Image.open(p).size for p in pngs] == [(64, 96)] * 2  # PIL: (width, height)
    spec = ModelSpec(preset="lumina-tiny", checkpoint=folder, size="64x96")
    cfg = spec.config()
    assert (cfg.grid_h, cfg.grid_width, cfg.line_tokens, cfg.image_tokens) == (6, 4, 5, 30)
    assert cfg.cache_plan(CacheSpec("linear", rho="1/2")).budget == 3 * 5  # 3 whole lines of 4 codes + end-of-line
    enc = spec.prompt_encoder()
    ids = enc.encode(prompts)
    vocab = enc.vocab
    assert all(i[-3:] == [vocab.begin_of_image, vocab.size_id(96 // 32), vocab.size_id(64 // 32)] for i in ids)
    assert ids == LuminaPromptEncoder.from_folder(folder).encode(prompts, "64x96")
    gen = generate_tokens(spec.build_model(), Condition.prompts(ids), [0, 1], cache_spec=CacheSpec("linear", rho="1/2"),
                          sampling=SamplingConfig(cfg_scale=4.0, temperature=0.0, top_k=2000))
    images = to_uint8(spec.build_decoder().decode_codes(gen.tokens.view(2, 6, 5)), "truncate")  # as Lumina casts
    for png, image in zip(pngs, images):
        assert np.array_equal(np.asarray(Image.open(png)), image)


@pytest.mark.parametrize("argv, message", [
    (["--model", "lumina-tiny", "--size", "100x64"], "size: image size 100x64: width and height must be positive "
                                                      "multiples of 32 px"),
    (["--model", "GPT-tiny", "--vq", "random", "--size", "256x256"], "size: '256x256' is for Lumina-mGPT models"),
])
def test_cli_size_errors_name_the_value_and_the_rule(folder, capsys, argv, message):
    code = cli.main(["sample", "--checkpoint", folder if "lumina-tiny" in argv else "random", "--prompt", "a fox",
                     *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flags, model, lines", [
    ([], "lumina-mgpt-768", 6),  # 48 lines x 1/8: the family's LineAR budget
    (["--rho", "1/4"], "lumina-mgpt-768", 12),  # an explicit budget wins
    (["--cache-lines", "5"], "lumina-mgpt-768", 5),
    ([], "GPT-B", 3),  # other families keep the headline 1/6 (16 lines)
])
def test_sample_default_linear_budget_is_the_familys(flags, model, lines):
    argv = ["sample", "--model", model, "--checkpoint", "random", "--cache", "linear", *flags]
    if model == "GPT-B":
        argv += ["--vq", "random"]
    spec, cache, _ = cli.sample_settings(cli.build_parser().parse_args(argv))
    assert spec.config().cache_plan(cache).budget_lines == lines


def test_job_default_linear_budget_is_the_familys():
    job = JobConfig.from_dict(dict(source="p.jsonl", output="out", model=dict(preset="lumina-mgpt-768", checkpoint="random"),
                                   cache=dict(policy="heavy_hitter")))
    assert job.cache.rho == 1 / 8 and job.model.config().cache_plan(job.cache).budget_lines == 6
    explicit = JobConfig.from_dict(dict(source="p.jsonl", output="out", cache=dict(policy="linear", rho="1/4"),
                                        model=dict(preset="lumina-mgpt-768", checkpoint="random")))
    assert explicit.cache.rho == 1 / 4
    with pytest.raises(ValueError, match="needs a budget"):  # other families: a job names its budget, as before
        JobConfig.from_dict(dict(source="p.jsonl", output="out", cache=dict(policy="linear"),
                                 model=dict(preset="GPT-B", checkpoint="random", decoder="random")))


def test_lumina_job_at_a_requested_size(ray_session, s3, folder):  # noqa: F811
    """model.size in a job: the pipeline's generate and decode stages use the requested grid (64x96: 6 lines
    of 4 codes), not the preset's, and the 1/8 default budget applies to `policy: linear` alone."""
    source = put(s3, "prompts/lumina-sized.jsonl", jsonl_bytes([{"id": "fox", "prompt": "a red fox in snow"},
                                                                 {"id": "cat", "prompt": "blue cat", "count": 2}]))
    model = dict(preset="lumina-tiny", checkpoint=folder, size="64x96")
    job = JobConfig.from_dict(tiny_job(source, "s3://bucket/out/lumina-sized", model=model, storage_options=s3.options,
                                       cache={"policy": "linear"}))
    assert job.cache.rho == 1 / 8
    assert run_job(job, progress=False).images == 3
    table = read_dataset(s3.fs(), "bucket/out/lumina-sized")
    shapes = {np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).shape for r in table.to_pylist()}
    assert shapes == {(96, 64, 3)}  # height x width


def test_lumina_job_with_a_size_per_row(ray_session, s3, folder):  # noqa: F811
    """Rows ask their own size (two non-square ones and a square one), leave it out (the preset's 96x64), let the
    model draw it ("sample"), or ask one the model does not make (quarantined, the reason names the row's size).
    Every good id is written once; each PNG has its row's size and equals that prompt at that size generated alone
    with the image's seed (batches of one grid each: rows are grouped by size)."""
    import pyarrow.parquet as pq

    from lineray.images import to_uint8
    from lineray.workers.replica import LocalReplica, ReplicaConfig, sample_sizes_then_generate
    rows = [{"id": "wide", "prompt": "a red fox in snow", "size": "128x64", "seed": 1},
            {"id": "tall", "prompt": "blue cat sits on the mat", "size": "64x128", "seed": 2, "count": 2},
            {"id": "plain", "prompt": "green tree", "seed": 3},
            {"id": "square", "prompt": "a red fox", "size": "96x96"},
            {"id": "huge", "prompt": "a red fox", "size": "256x256"},
            {"id": "drawn", "prompt": "small cat", "size": "sample", "seed": 9},
            {"id": "odd", "prompt": "a red fox", "size": "100x64"}]
    source = put(s3, "prompts/lumina-rows.jsonl", jsonl_bytes(rows))
    model = dict(preset="lumina-tiny", checkpoint=folder)
    job = JobConfig.from_dict(tiny_job(source, "s3://bucket/out/lumina-rows", model=model, storage_options=s3.options,
                                       sampling=dict(cfg_scale=4.0, top_k=2000), shard_rows=4, max_batch_size=3,
                                       max_error_fraction=0.5, cache={"policy": "linear", "rho": "1/2"}))
    summary = run_job(job, progress=False)
    assert (summary.images, summary.errors) == (6, 2)
    fs = s3.fs()
    errors = {r["id"]: r["reason"] for r in pq.read_table("bucket/out/lumina-rows/errors", filesystem=fs).to_pylist()}
    assert set(errors) == {"huge", "odd"}
    assert errors["huge"].startswith("bad size '256x256': image size 256x256 is larger than this model makes")
    assert errors["odd"].startswith("bad size '100x64'") and "multiples of 32 px" in errors["odd"]
    got = {(r["id"], r["image_index"]): r for r in read_dataset(fs, "bucket/out/lumina-rows").to_pylist()}
    assert sorted(got) == [("drawn", 0), ("plain", 0), ("square", 0), ("tall", 0), ("tall", 1), ("wide", 0)]
    want_size = {"wide": (128, 64), "tall": (64, 128), "plain": (96, 64), "square": (96, 96)}
    spec = ModelSpec(preset="lumina-tiny", checkpoint=folder)
    decoder = spec.build_decoder()
    prompt_of = {r["id"]: r["prompt"] for r in rows}
    for (pid, k), row in got.items():
        png = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert png.shape == (row["height"], row["width"], 3)
        if pid == "drawn":  # alone: its size drawn from its seed, then generated at that size
            alone = LocalReplica(ReplicaConfig(model=spec.replace(size="sample"), sampling=job.sampling, cache=job.cache))
            ids = alone.cfg.model.prompt_encoder().encode([prompt_of[pid]], "sample")
            (tokens,), ((h, w),) = sample_sizes_then_generate(alone, ids, [row["seed"]])
            want = to_uint8(decoder.decode_codes(tokens.view(1, h, w + 1)), "truncate")[0]
        else:
            width, height = want_size[pid]
            assert (row["width"], row["height"]) == (width, height), pid
            sized = spec.replace(size=f"{width}x{height}")
            ids = sized.prompt_encoder().encode([prompt_of[pid]])
            gen = generate_tokens(sized.build_model(), Condition.prompts(ids), [row["seed"]], sampling=job.sampling,
                                  cache_spec=job.cache)
            want = to_uint8(decoder.decode_codes(gen.tokens.view(1, height // 16, width // 16 + 1)), "truncate")[0]
        # The same tokens; pixels up to 1 apart where the VQGAN's float output, decoded in another batch shape,
        # lands across an integer (uint8 conversion truncates). A different token changes a whole 16 px patch.
        diff = np.abs(png.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (pid, k, diff.max(), (diff > 0).sum())
    assert not np.array_equal(*(np.asarray(Image.open(io.BytesIO(got["tall", k]["image"]["bytes"]))) for k in (0, 1)))


def test_cli_sample_draws_the_size(folder, tmp_path, capsys):
    """--size sample: the model draws each image's size (a crop size of its 96 px target); the PNGs have the sizes
    the replica draws for those seeds, and the contact sheet holds images of different sizes."""
    from lineray.kernels.sampling import SamplingConfig as Sampling
    from lineray.models.lumina.sizes import crop_sizes
    from lineray.workers.replica import LocalReplica, ReplicaConfig
    prompts = ["a red fox in snow", "blue cat sits on the mat", "green tree", "small cat"]
    out = tmp_path / "out"
    argv = ["sample", "--model", "lumina-tiny", "--checkpoint", folder, "--size", "sample", "--device", "cpu",
            "--seed", "3", "--out", str(out)]
    for p in prompts:
        argv += ["--prompt", p]
    code = cli.main(argv)
    assert code == 0, capsys.readouterr().err
    sizes = [Image.open(p).size for p in sorted(out.glob("000*.png"))]  # (width, height)
    assert set(sizes) <= {(s.width, s.height) for s in crop_sizes(96)} and len(set(sizes)) >= 2, sizes
    spec = ModelSpec(preset="lumina-tiny", checkpoint=folder, size="sample")
    replica = LocalReplica(ReplicaConfig(model=spec, sampling=Sampling(cfg_scale=4.0, top_k=2000)))
    grids = replica.sample_grids(Condition.prompts(spec.prompt_encoder().encode(prompts, "sample")), [3, 4, 5, 6])
    assert sizes == [(cols * 16, rows * 16) for rows, cols in grids]


def test_row_rules_take_the_jobs_size_and_each_rows_own(folder):
    """`model.size: sample` in a job: rows without a size are drawn by the model (their prefix ends at
    begin-of-image, grid unknown until generated); a row's own size wins; a row's bad size is its reason."""
    from lineray.pipelines.prompts import SAMPLED_GRID, RowError, RowRules, parse_prompt
    job = JobConfig.from_dict(dict(source="p.jsonl", output="out",
                                   model=dict(preset="lumina-tiny", checkpoint=folder, size="sample")))
    rules = RowRules.for_job(job)
    vocab = rules.encoder.vocab
    drawn = parse_prompt({"id": 1, "prompt": "a red fox"}, rules)
    assert drawn.grid == SAMPLED_GRID and drawn.prompt_ids[-1] == vocab.begin_of_image
    own = parse_prompt({"id": 2, "prompt": "a red fox", "size": "64x128"}, rules)
    assert own.grid == (8, 4) and own.prompt_ids[-3:] == [vocab.begin_of_image, vocab.size_id(4), vocab.size_id(2)]
    for size, reason in (("48", "bad size '48': image size 48x48: width and height must be positive multiples"),
                         ("64x", "must be WIDTHxHEIGHT"),
                         ("32x160", "more than 4:1"), ("128x128", "larger than this model makes")):
        with pytest.raises(RowError, match=reason):
            parse_prompt({"id": 3, "prompt": "a red fox", "size": size}, rules)
