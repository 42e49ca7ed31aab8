"""Prompt sources, row checks, seeds and job configs: no Ray, real files on local disk, memory:// and moto S3."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import yaml
import numpy as np
import pytest
from pipeline_helpers import S3Server, csv_bytes, jsonl_bytes, parquet_bytes, tiny_job

from lineray.pipelines import JobConfig, JobConfigError, PromptSource, RowRules, SourceError, image_seed, iter_shards
from lineray.pipelines.config import apply_overrides, load_yaml, parse_set
from lineray.pipelines.prompts import IdSet, RowError, parse_prompt
from lineray.pipelines.sources import BUNDLED_PROMPTS

REPO = Path(__file__).resolve().parent.parent
C2I = RowRules(model_type="c2i", num_classes=10, caption_tokens=1, caption_dim=8, has_text_encoder=False,
               default_cfg=2.0, job_seed=7, max_count=5)
T2I = RowRules(model_type="t2i", num_classes=10, caption_tokens=4, caption_dim=8, has_text_encoder=False,
               default_cfg=2.0, job_seed=7, max_count=5)

ROWS = [{"id": "a", "class": 1}, {"id": "b", "class": 2, "seed": 5, "count": 2},
        {"id": "c", "class": 3, "cfg": 3.5}, {"id": 4, "class": 4}, {"id": "e", "class": 12},
        {"id": "a", "class": 5}, {"class": 6}]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.fs().mkdir("prompts")
    yield server
    server.stop()


def _write(fs, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _summary(source: PromptSource, rules=C2I, shard_rows=3):
    images, errors, keys = [], [], []
    for shard in iter_shards(source, rules, shard_rows):
        keys.append(shard.key)
        images += [(i["row"], i["id"], i["image_index"], i["label"], i["seed"], i["cfg_scale"]) for i in shard.images]
        errors += [(e["row"], e["id"], e["reason"].split(":")[0]) for e in shard.errors]
    return images, errors, keys


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_and_filesystems_give_the_same_shards(where, fmt, tmp_path, s3):
    data = {"jsonl": lambda: jsonl_bytes(ROWS),
            "csv": lambda: csv_bytes(ROWS, ["id", "class", "seed", "count", "cfg"]),
            "parquet": lambda: parquet_bytes([{"id": None if "id" not in r else str(r["id"]),
                                               **{k: r.get(k) for k in ("class", "seed", "count", "cfg")}}
                                              for r in ROWS])}[fmt]()
    if where == "local":
        fs, url, opts = fsspec.filesystem("file"), str(tmp_path / f"p.{fmt}"), {}
        path = url
    elif where == "memory":
        fs, url, opts = fsspec.filesystem("memory"), f"memory://src-{fmt}/p.{fmt}", {}
        path = url
    else:
        fs, url, opts = s3.fs(), f"s3://prompts/{fmt}/p.{fmt}", s3.options
        path = url[5:]
    _write(fs, path, data)
    source = PromptSource(url, storage_options=opts)
    assert len(source.files()) == 1
    assert sum(source.count_rows().values()) == len(ROWS)
    images, errors, keys = _summary(source)
    # Parquet gives ids as strings or ints by column type; CSV gives strings: both become "4".
    assert [(r, i, k, c) for r, i, k, c, _, _ in images] == [
        (1, "a", 0, 1), (2, "b", 0, 2), (2, "b", 1, 2), (3, "c", 0, 3), (4, "4", 0, 4)]
    seeds = {(i, k): s for _, i, k, _, s, _ in images}
    assert seeds[("b", 0)] == 5 and seeds[("b", 1)] == 6  # a row's own seed, + image index
    assert seeds[("a", 0)] == image_seed(7, "a", 0)
    assert [c for *_, c in images] == [2.0, 2.0, 2.0, 3.5, 2.0]  # the row's cfg, else the job's
    assert errors == [(5, "e", "unknown class 12"), (6, "a", "duplicate id 'a'"), (7, None, "missing id")]
    assert len(keys) == 3 and all(k.startswith(f"p.{fmt}-") for k in keys)


def test_each_bad_row_gets_its_reason():
    emb_ok = np.ones((2, 8)).tolist()
    rows = [{"id": "ok", "text": "t", "embedding": emb_ok},
            "{not json",
            {"id": "shape", "embedding": np.ones((2, 7)).tolist()},
            {"id": "long", "embedding": np.ones((5, 8)).tolist()},
            {"id": "nan", "embedding": [[float("nan")] * 8]},
            {"id": "text-only", "text": "a cat"},
            {"id": "nothing"},
            {"id": "cfg", "embedding": emb_ok, "cfg": 0.5},
            {"id": "count", "embedding": emb_ok, "count": 9},
            {"id": "seed", "embedding": emb_ok, "seed": -1},
            "[1, 2]",
            {"id": "ok", "embedding": emb_ok},
            ""]
    fs = fsspec.filesystem("memory")
    _write(fs, "/bad/p.jsonl", jsonl_bytes(rows))
    shards = list(iter_shards(PromptSource("memory://bad/p.jsonl"), T2I, shard_rows=100))
    reasons = {e["row"]: e["reason"] for s in shards for e in s.errors}
    assert [i["id"] for s in shards for i in s.images] == ["ok"]
    expect = {2: "malformed JSON line", 3: "wrong embedding shape [2, 7]", 4: "wrong embedding shape [5, 8]",
              5: "bad embedding: it has NaN", 6: "text row but the job has no text encoder",
              7: "missing text or embedding", 8: "bad cfg 0.5", 9: "bad count 9", 10: "bad seed -1",
              11: "row is a JSON list", 12: "duplicate id 'ok'"}
    assert sorted(reasons) == sorted(expect)  # the blank line 13 is not a row
    for row, start in expect.items():
        assert reasons[row].startswith(start), (row, reasons[row])
    bad = next(e for s in shards for e in s.errors if e["row"] == 2)
    assert bad["raw"] == "{not json" and bad["file"].endswith("/bad/p.jsonl")


def test_prompt_fields_are_parsed_from_csv_strings():
    p = parse_prompt({"id": "x", "class": "3", "seed": "11", "cfg": "1.5", "count": "2"}, C2I)
    assert (p.label, p.seed, p.cfg_scale, p.count) == (3, 11, 1.5, 2)
    assert p.image_seeds(7) == [11, 12]
    with pytest.raises(RowError, match="unknown class 'cat'"):
        parse_prompt({"id": "x", "class": "cat"}, C2I)
    with pytest.raises(RowError, match="missing class"):
        parse_prompt({"id": "x", "text": "a cat"}, C2I)
    flat = parse_prompt({"id": "y", "embedding": json.dumps(list(range(16)))}, T2I)
    assert flat.embedding.shape == (2, 8)


def test_image_seeds_depend_only_on_job_seed_id_and_index():
    assert image_seed(0, "a", 0) == image_seed(0, "a", 0)
    assert len({image_seed(0, "a", 0), image_seed(0, "a", 1), image_seed(0, "b", 0), image_seed(1, "a", 0)}) == 4
    assert all(0 <= image_seed(s, "x", k) < 2**63 for s in range(5) for k in range(5))


def test_id_set_finds_duplicates_across_flushed_runs():
    ids = IdSet(flush_at=100)
    first = ids.add_batch([f"id{i}" for i in range(1000)])
    assert all(first) and len(ids) == 1000 and len(ids._runs) <= 6  # merged like a binary counter
    again = ids.add_batch(["id5", "new", "id999", "new"])
    assert again == [False, True, False, False]
    assert sum(r.nbytes for r in ids._runs) <= 8 * 1001


def test_folders_globs_gzip_and_stable_shard_keys(tmp_path):
    for root in (tmp_path / "one", tmp_path / "two" / "deeper"):
        (root / "sub").mkdir(parents=True)
        (root / "a.jsonl").write_bytes(jsonl_bytes(ROWS[:2]))
        (root / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(ROWS[2:4])))
        (root / "notes.txt").write_text("not prompts")
    one, two = PromptSource(str(tmp_path / "one")), PromptSource(str(tmp_path / "two" / "deeper"))
    assert [Path(f).name for f in one.files()] == ["a.jsonl", "b.jsonl.gz"]
    assert list(one.count_rows().values()) == [2, 2]
    # The same files under another folder get the same shard keys (keys use paths below the source).
    assert _summary(one)[2] == _summary(two)[2]
    glob = PromptSource(str(tmp_path / "one" / "*.jsonl"))
    assert [Path(f).name for f in glob.files()] == ["a.jsonl"]
    assert _summary(glob)[2] == _summary(one)[2][:1]
    with pytest.raises(SourceError, match="prompt source not found"):
        PromptSource(str(tmp_path / "missing.jsonl")).files()
    with pytest.raises(SourceError, match="unknown prompt file type"):
        PromptSource(str(tmp_path / "one" / "notes.txt")).files()


def test_bundled_sample_prompts():
    source = PromptSource("bundled")
    assert source.files() == [str(BUNDLED_PROMPTS)]
    images, errors, _ = _summary(source, shard_rows=16)
    assert len(images) == 40 and not errors
    assert sorted({c for *_, c, _, _ in [(r, i, k, c, s, g) for r, i, k, c, s, g in images]}) == list(range(10))


def test_job_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("source: bundled\noutput: out\nmodel: {preset: GPT-tiny, checkpoint: random, decoder: random}\n"
                    "cache: {policy: linear, rho: 1/4}\nreplicas: 2\n")
    job = JobConfig.from_yaml(path, parse_set(["cache.rho=1/2", "batch_size=3", "sampling.cfg_scale=1.5"]))
    assert job.cache.rho == 0.5 and job.batch_size == 3 and job.replicas == 2 and job.sampling.cfg_scale == 1.5
    assert job.sampling.top_k == 2000  # the model's defaults fill the rest
    again = JobConfig.from_dict(job.to_dict())
    assert again == job and again.fingerprint() == job.fingerprint()
    assert job.replace(replicas=5).fingerprint() == job.fingerprint()  # replicas do not change the output
    assert job.replace(seed=1).fingerprint() != job.fingerprint()
    base = tiny_job("s", "o")
    with pytest.raises(JobConfigError, match="replica: unknown job setting"):
        JobConfig.from_dict(base | {"replica": 2})
    with pytest.raises(JobConfigError, match="batch_size must be a whole number >= 1"):
        JobConfig.from_dict(base | {"batch_size": 0})
    with pytest.raises(ValueError, match="rho must be"):
        JobConfig.from_dict(base | {"cache": {"policy": "linear", "rho": "a/b"}})
    with pytest.raises(JobConfigError, match="unknown sampling"):
        JobConfig.from_dict(base | {"sampling": {"temp": 1}})
    with pytest.raises(JobConfigError, match="--set wants KEY=VALUE"):
        parse_set(["cache.rho"])
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2, "d.e": 3}) == {"a": {"b": 1, "c": 2}, "d": {"e": 3}}
    JobConfig.from_dict(tiny_job("bundled", "out"))


def _bundled_model_ready() -> bool:
    try:
        from lineray.models.digits import bundled_config, bundled_sampling
        bundled_config(), bundled_sampling()
        return True
    except (ImportError, FileNotFoundError):
        return False


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "jobs").glob("*.yaml")))
def test_shipped_job_configs_load(name):
    if "digits" in name and not _bundled_model_ready():
        pytest.skip("the bundled digits model is not in this checkout")
    data = load_yaml(REPO / "configs" / "jobs" / name)
    if data["model"]["preset"].startswith("janus"):  # its config.json is in the (absent) folder: the preset stands in
        assert data["model"]["checkpoint"].startswith("/models/")
        data["model"]["checkpoint"] = "random"
    job = JobConfig.from_dict(data)
    assert job.source and job.output and job.replicas >= 1
    g = job.model.config().grid_size if not job.model.is_bundled else None
    if g:
        job.cache.plan(g, g, g * g)


def test_cli_flags_override_the_job_file(tmp_path, capsys):
    import argparse

    from lineray import cli

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job("bundled", str(tmp_path / "out"))))
    parser = argparse.ArgumentParser()
    cli.add_generate_arguments(parser)
    args = parser.parse_args([str(path), "--replicas", "3", "--cache", "linear", "--rho", "1/2", "--cfg-scale", "3",
                              "--set", "resources.decoders=2", "--grid-size", "8", "--address", "auto"])
    job = cli.job_from_args(args)
    assert (job.replicas, job.cache.policy, job.cache.rho, job.sampling.cfg_scale) == (3, "linear", 0.5, 3.0)
    assert (job.resources.decoders, job.model.grid_size, job.ray_address) == (2, 8, "auto")
    # A bad source fails before Ray starts, with one line naming it.
    assert cli.main(["generate", str(path), "--source", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt source not found" in err[0] and "nope.jsonl" in err[0]
