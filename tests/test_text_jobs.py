"""Text-prompt families (Janus-Pro) from the front door to the sink: prompt rows, a job on moto S3,
`lineray sample --prompt`, `lineray.api.sample(prompts=...)`, `lineray presets`, one-line errors.

The model is janus-tiny (Janus-Pro's modules, 2 layers, width 64, 6 x 6 image tokens) with random
weights and a tiny word-level tokenizer.json holding the template's special tokens.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from janus_fixtures import PROMPTS, janus, prompt_ids, write_tokenizer  # noqa: F401
from pipeline_helpers import TINY_JANUS, jsonl_bytes, put, ray_session, read_dataset, s3, tiny_job  # noqa: F401

from lineray import cli
from lineray.api import sample
from lineray.models.generate import GenerationError
from lineray.models.spec import ModelSpec
from lineray.pipelines import JobConfig, RowRules, image_seed, iter_shards, run_job
from lineray.pipelines.sink import PROMPT_IMAGE_SCHEMA
from lineray.pipelines.sources import PromptSource

pytestmark = pytest.mark.timeout(300)
MAX_PREFIX = 32  # janus-tiny's max_prefix_len
JANUS_PX = 96  # janus-tiny's 6 x 6 tokens through a VQ-16 decoder
TOO_LONG = " ".join(["fox"] * 40)  # 40 words + the template's 7 tokens > 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("janus-tokenizer")
    write_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model(tokenizer):
    return dict(TINY_JANUS, tokenizer=tokenizer)


def text_job(source: str, output: str, model: dict, **kw) -> JobConfig:
    return JobConfig.from_dict(tiny_job(source, output, model=model, sampling=dict(cfg_scale=5.0, top_k=0), **kw))


def test_text_rows_are_tokenized_and_bad_ones_rejected(model, tmp_path):
    rows = [{"id": "fox", "prompt": "a red fox in snow", "seed": 7},
            {"id": "cat", "prompt": "a blue cat on the moon", "count": 2},
            {"id": "empty", "prompt": ""}, {"id": "blank", "prompt": "  \n "}, {"id": "long", "prompt": TOO_LONG},
            {"prompt": "no id here"}, {"id": "caption", "text": "a text column is not a prompt"},
            {"id": "number", "prompt": 12}, {"id": 5, "caption": "renamed columns work"},
            {"id": "sized", "prompt": "a red fox", "size": "384x384"}]  # Janus-Pro makes one size only
    src = tmp_path / "prompts.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    job = text_job(str(src), str(tmp_path / "out"), model)
    rules = RowRules.for_job(job)
    assert (rules.model_type, rules.max_prefix_len) == ("text", MAX_PREFIX)
    (shard,) = iter_shards(PromptSource(str(src)), rules, shard_rows=16)
    reasons = {e["row"]: e["reason"] for e in shard.errors}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "empty prompt" in reasons[3] and "empty prompt" in reasons[4]
    assert "too long" in reasons[5] and f"at most {MAX_PREFIX}" in reasons[5] and "47 tokens" in reasons[5]
    assert reasons[6] == "missing id"
    assert reasons[7].startswith("missing prompt") and "columns: {prompt: NAME}" in reasons[7]
    assert reasons[8].startswith("bad prompt 12")
    assert reasons[10] == "bad size '384x384': this model makes images of one size; leave size out"

    encoder = job.model.prompt_encoder()
    images = {(i["id"], i["image_index"]): i for i in shard.images}
    assert sorted(images) == [("cat", 0), ("cat", 1), ("fox", 0)]
    fox = images[("fox", 0)]["prompt_ids"]
    assert fox == prompt_ids("a red fox in snow") == encoder.encode(["a red fox in snow"])[0]  # the template's ids
    assert fox[0] == encoder.bos_id and fox[-1] == encoder.boi_id and fox[0] == job.model.config().bos_token_id
    assert images[("fox", 0)]["seed"] == 7 and images[("cat", 1)]["seed"] == image_seed(0, "cat", 1)

    # The error budget applies: a file of mostly empty or too long prompts stops before anything is written.
    from lineray.pipelines.checks import check_first_rows
    from lineray.pipelines.rejects import TooManyBadRows
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl_bytes([{"id": f"e{i}", "prompt": ""} for i in range(6)] + [{"id": "l", "prompt": TOO_LONG}]))
    with pytest.raises(TooManyBadRows, match=r"7 of 7 rows rejected .*every row.* most common: empty prompt \(6\)"):
        check_first_rows(job.replace(source=str(bad)), PromptSource(str(bad)), rules)
    few = text_job(str(bad), str(tmp_path / "out3"), model, max_error_fraction=0.2, error_check_rows=4)
    with pytest.raises(TooManyBadRows, match="more than max_error_fraction 0.2"):  # and the fraction, past 4 rows
        check_first_rows(few, PromptSource(str(bad)), rules)

    # `columns` maps a differently named prompt column (row 9 above is rejected without it).
    mapped = text_job(str(src), str(tmp_path / "out2"), model, columns={"prompt": "caption"})
    (shard,) = iter_shards(PromptSource(str(src)), RowRules.for_job(mapped), shard_rows=16)
    assert [i["text"] for i in shard.images] == ["renamed columns work"]


def test_text_job_on_s3_quarantines_bad_rows_and_keeps_prompts(ray_session, s3, model, tmp_path):
    good = [{"id": "fox", "prompt": "a red fox in snow", "seed": 11},
            {"id": "fox-again", "prompt": "a red fox in snow", "seed": 11},  # same prompt and seed: same image
            {"id": "house", "prompt": "small green house under sky with stars at dusk", "seed": 11},
            {"id": "cat", "prompt": "cat", "count": 2}, {"id": "dogs", "prompt": "two dogs", "cfg": 3.0},
            {"id": "moon", "prompt": "oil painting of the moon"}]
    bad = [{"id": "empty", "prompt": ""}, {"id": "long", "prompt": TOO_LONG}, {"prompt": "a lighthouse"}]
    rows = good[:3] + bad[:1] + good[3:5] + bad[1:] + good[5:]
    source = put(s3, "prompts/janus.jsonl", jsonl_bytes(rows))
    job = text_job(source, "s3://bucket/out/janus", model, storage_options=s3.options, shard_rows=4,
                   cache={"policy": "linear", "lines": 2})
    summary = run_job(job, progress=False)
    assert (summary.images, summary.prompts, summary.errors) == (7, 9, 3)

    fs = s3.fs()
    table = read_dataset(fs, "bucket/out/janus")
    assert table.schema.equals(PROMPT_IMAGE_SCHEMA, check_metadata=True)
    got = {(r["id"], r["image_index"]): r for r in table.to_pylist()}
    assert Counter(zip(table["id"].to_pylist(), table["image_index"].to_pylist())).most_common(1)[0][1] == 1
    assert set(got) == {(r["id"], 0) for r in good} | {("cat", 1)}
    assert all(got[(r["id"], 0)]["prompt"] == r["prompt"] for r in good)
    assert got[("dogs", 0)]["cfg_scale"] == 3.0 and got[("moon", 0)]["cfg_scale"] == 5.0
    pixels = {k: np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))) for k, r in got.items()}
    assert {p.shape for p in pixels.values()} == {(JANUS_PX, JANUS_PX, 3)}
    assert np.array_equal(pixels[("fox", 0)], pixels[("fox-again", 0)])  # batch and shard do not matter
    assert not np.array_equal(pixels[("fox", 0)], pixels[("house", 0)])  # the prompt reaches the model

    errors = [e for path in fs.ls("bucket/out/janus/errors") for e in pq.read_table(fs.open(path)).to_pylist()]
    by_row = {e["row"]: e for e in errors}
    assert sorted(by_row) == [4, 7, 8]
    assert by_row[4]["id"] == "empty" and "empty prompt" in by_row[4]["reason"]
    assert by_row[7]["id"] == "long" and "too long" in by_row[7]["reason"]
    assert by_row[8]["id"] is None and by_row[8]["reason"] == "missing id" and "lighthouse" in by_row[8]["raw"]

    # Each image is the one its prompt gives alone (api.sample, one prompt per call, same seed and settings):
    # left padding in a batch of mixed prompt lengths changes nothing.
    spec = ModelSpec(**model)
    for key in [("house", 0), ("cat", 1), ("dogs", 0)]:
        row = got[key]
        alone = sample(prompts=[row["prompt"]], seeds=[row["seed"]], model=spec, cache=job.cache,
                       sampling=replace(job.sampling, cfg_scale=row["cfg_scale"]),
                       device="cpu", progress=False)
        assert np.abs(alone.images[0].astype(int) - pixels[key].astype(int)).max() <= 1, key

    # The export's contact sheet is captioned with the prompts.
    from lineray.pipelines.export import export_images
    n, sheet = export_images("s3://bucket/out/janus", tmp_path / "png", storage_options=s3.options)
    assert n == 7 and sheet.is_file() and (tmp_path / "png" / "fox_0.png").is_file()


def test_tp2_gives_the_tp1_tokens_for_prompts(ray_session, model):
    """Random weights are the same model at any tp (a row-parallel bias included), so the tokens are too."""
    from lineray.cache import CacheSpec
    prompts = ["a red fox in the snow", "the moon", "a lighthouse at night with stars and waves"]
    one, two = (sample(prompts=prompts, model=ModelSpec(**model), cache=CacheSpec("linear", lines=2), tp=tp,
                       device="cpu", progress=False) for tp in (1, 2))
    assert one.tokens.tolist() == two.tokens.tolist()


def test_cli_sample_writes_pngs_for_prompts(model, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("two dogs on the moon\n\na lighthouse at dusk\n")
    vq = json.dumps(model["vq_config"])
    code = cli.main(["sample", "--model", "janus-tiny", "--checkpoint", "random", "--tokenizer", model["tokenizer"],
                     "--set", f"model.vq_config={vq}", "--prompt", "a red fox in snow", "--prompt", "blue cat",
                     "--prompts-file", str(prompts_file), "--cache", "linear", "--cache-lines", "2",
                     "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["0000_a-red-fox-in-snow.png", "0001_blue-cat.png", "0002_two-dogs-on-the-moon.png",
                     "0003_a-lighthouse-at-dusk.png", "contact_sheet.png"]
    assert Image.open(tmp_path / "out" / "0000_a-red-fox-in-snow.png").size == (JANUS_PX, JANUS_PX)
    assert "wrote 4 images" in capsys.readouterr().out

    # The API: the same prompts, the same seeds -> the same images as the command line.
    result = sample(prompts=["a red fox in snow", "blue cat"], model=ModelSpec(**model), device="cpu", progress=False,
                    cache=cli.sample_settings(cli.build_parser().parse_args(
                        ["sample", "--cache", "linear", "--cache-lines", "2"]))[1])
    assert result.prompts == ["a red fox in snow", "blue cat"] and result.labels == []
    assert np.array_equal(result.images[0], np.asarray(Image.open(tmp_path / "out" / "0000_a-red-fox-in-snow.png")))


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lineray: error: "), err
    return err[0]


def test_errors_are_one_line_and_name_the_problem(model, tmp_path, capsys):
    folder = tmp_path / "Janus-Pro-1B"
    folder.mkdir()
    sample_janus = ["sample", "--model", "janus-pro-1b", "--checkpoint", str(folder), "--prompt", "a fox"]
    assert "has no config.json" in _one_line_error(capsys, sample_janus)
    (folder / "config.json").write_text("{}")
    assert "has no tokenizer.json" in _one_line_error(capsys, sample_janus)
    assert "not found" in _one_line_error(capsys, ["sample", "--model", "janus-pro-1b", "--checkpoint",
                                                   str(tmp_path / "nope"), "--prompt", "a fox"])

    err = _one_line_error(capsys, ["sample", "--model", "janus-pro-3b", "--checkpoint", str(folder), "--prompt", "x"])
    assert "unknown model preset 'janus-pro-3b'" in err and "janus: janus-tiny, janus-pro-1b, janus-pro-7b" in err
    assert "llamagen: GPT-B" in err

    tiny = ["sample", "--model", "janus-tiny", "--checkpoint", "random", "--tokenizer", model["tokenizer"]]
    err = _one_line_error(capsys, tiny + ["--prompt", "a fox", "--tp", "3"])
    assert "tp=3 does not fit janus-tiny" in err and "valid tensor-parallel sizes are 1, 2, 4" in err
    assert "--prompt TEXT" in _one_line_error(capsys, tiny)
    err = _one_line_error(capsys, tiny + ["--prompt", "a fox", "--prompt", TOO_LONG])
    assert err.startswith("lineray: error: prompt 2: ") and "too long" in err
    assert "prompt 1: empty prompt" in _one_line_error(capsys, tiny + ["--prompt", " "])
    err = _one_line_error(capsys, ["sample", "--model", "janus-tiny", "--checkpoint", "random", "--prompt", "a fox"])
    assert "give tokenizer: PATH" in err
    err = _one_line_error(capsys, tiny + ["--classes", "1,2"])
    assert "this model takes text prompts: --prompt TEXT" in err

    # API: class ids for a text model, prompts for a class model.
    with pytest.raises(GenerationError, match="text-prompt model: pass prompts"):
        sample([1, 2], model=ModelSpec(**model), device="cpu")
    with pytest.raises(GenerationError, match="takes class ids, not text prompts"):
        sample(prompts=["a fox"], model=ModelSpec(preset="GPT-tiny", checkpoint="random", decoder="random"))

    # A job: a text model with LlamaGen's T5 text encoder is refused before Ray starts.
    path = tmp_path / "job.yaml"
    import yaml
    path.write_text(yaml.safe_dump(tiny_job("p.jsonl", str(tmp_path / "o"), model=model, text_encoder="t5")))
    assert "tokenizes its own prompts" in _one_line_error(capsys, ["generate", str(path)])


def test_presets_are_grouped_by_family(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    llamagen, janus = out.index("\nllamagen:"), out.index("\njanus:")
    assert llamagen < out.index("GPT-XL") < janus < out.index("janus-pro-1b") < out.index("janus-pro-7b")
    assert "needs --checkpoint FOLDER" in out[janus:] and "needs --checkpoint FILE" in out[llamagen:janus]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("janus-pro-7b"))
    assert line.split()[1:4] == ["30", "4096", "32"] and "24x24" in line and line.endswith("1,2,4,8,16,32")


def test_front_door_on_a_downloaded_folder_gives_transformers_tokens(janus, tmp_path, capsys):
    """`--model janus --checkpoint FOLDER`: config, tokenizer, weights and VQ decoder all from the folder (both
    layouts), and the greedy tokens are transformers' own (tests/janus_fixtures.py's oracle)."""
    from lineray.kernels.sampling import SamplingConfig
    for folder in (janus.tf_dir, janus.deepseek_dirs["bin-shards"]):
        spec = ModelSpec(preset="janus", checkpoint=str(folder))
        result = sample(prompts=[PROMPTS[0]], model=spec, sampling=SamplingConfig(cfg_scale=5.0, temperature=0.0),
                        device="cpu", progress=False)
        assert result.tokens[0].tolist() == janus.oracle[0, 5.0].tokens.tolist(), folder
    code = cli.main(["sample", "--model", "janus", "--checkpoint", str(janus.tf_dir), "--prompt", PROMPTS[1],
                     "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0 and len(list(tmp_path.glob("0000_a-portrait-of-a-young-girl*.png"))) == 1
    capsys.readouterr()
    err = _one_line_error(capsys, ["sample", "--model", "janus-pro-1b", "--checkpoint", str(janus.tf_dir),
                                   "--prompt", "a fox"])
    assert "holds a model of n_layer 2 x dim 64 x n_head 4, not janus-pro-1b" in err
