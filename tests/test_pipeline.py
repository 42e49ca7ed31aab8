"""The batch job end to end on Ray (CPU): moto S3 in and out, 2 replicas, the output dataset, bad rows."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_helpers import IMAGE_PX, jsonl_bytes, put, ray_session, read_dataset, s3, tiny_job  # noqa: F401

from lineray.pipelines import JobConfig, image_seed, run_job
from lineray.pipelines.sink import IMAGE_SCHEMA, Output

pytestmark = pytest.mark.timeout(300)


def test_s3_end_to_end_with_two_replicas(ray_session, s3, tmp_path):
    rows = [{"id": f"img-{i:02d}", "class": i % 10} for i in range(10)]
    rows += [{"id": "two", "class": 3, "count": 2}, {"id": "seeded", "class": 4, "seed": 1234},
             {"id": "strong", "class": 5, "cfg": 6.0}]
    source = put(s3, "prompts/e2e.jsonl", jsonl_bytes(rows))
    job = JobConfig.from_dict(tiny_job(source, "s3://bucket/out/e2e", replicas=2, storage_options=s3.options,
                                       cache={"policy": "linear", "lines": 2}))
    summary = run_job(job, progress=False)
    assert (summary.images, summary.prompts, summary.errors, summary.shards) == (14, 13, 0, 4)

    fs = s3.fs()
    table = read_dataset(fs, "bucket/out/e2e")
    assert table.schema.equals(IMAGE_SCHEMA, check_metadata=True)  # including the Hugging Face features
    keys = Counter(zip(table["id"].to_pylist(), table["image_index"].to_pylist()))
    assert set(keys) == {(r["id"], 0) for r in rows} | {("two", 1)} and max(keys.values()) == 1
    got = {(r["id"], r["image_index"]): r for r in table.drop(["image"]).to_pylist()}
    assert got[("seeded", 0)]["seed"] == 1234
    assert got[("two", 1)]["seed"] == image_seed(0, "two", 1) and got[("two", 1)]["count"] == 2
    assert got[("strong", 0)]["cfg_scale"] == 6.0 and got[("img-00", 0)]["cfg_scale"] == 2.0
    assert got[("img-07", 0)]["label"] == 7 and got[("img-07", 0)]["cache_policy"].startswith("linear 2/4 lines")
    for image in table["image"].to_pylist():
        png = Image.open(io.BytesIO(image["bytes"]))
        assert png.format == "PNG" and png.size == (IMAGE_PX, IMAGE_PX) and png.mode == "RGB"
    assert {r["width"] for r in got.values()} == {IMAGE_PX}

    manifest = Output("s3://bucket/out/e2e", s3.options).committed()
    assert len(manifest) == 4 and sum(e["images"] for e in manifest.values()) == 14
    assert json.loads(fs.cat_file("bucket/out/e2e/_summary.json"))["total_images"] == 14

    datasets = pytest.importorskip("datasets")
    fs.get("bucket/out/e2e/data/", str(tmp_path / "data"), recursive=True)
    hf = datasets.load_dataset("parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(hf.features["image"], datasets.Image) and hf.num_rows == 14
    assert hf[0]["image"].size == (IMAGE_PX, IMAGE_PX)

    # Rerunning the finished job says so, starts no pipeline and writes nothing twice.
    logs = []
    again = run_job(job, progress=False, log=logs.append)
    assert (again.images, again.skipped_shards, again.total_images) == (0, 4, 14)
    assert any("is complete (4 shards): nothing to do" in m for m in logs), logs


def test_bad_rows_go_to_the_errors_dataset(ray_session, tmp_path):
    rows = [{"id": "ok-1", "class": 1}, {"id": "bad-class", "class": 42}, "{oops", {"class": 2},
            {"id": "ok-1", "class": 3}, {"id": "ok-2", "class": 2},
            {"id": "all-bad-1", "class": -1}, {"id": "all-bad-2", "count": 0, "class": 1}]  # shard 2: no images
    src = tmp_path / "prompts.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    out = tmp_path / "out"
    logs = []
    summary = run_job(JobConfig.from_dict(tiny_job(str(src), str(out), shard_rows=6)), progress=False,
                      log=logs.append)
    assert (summary.images, summary.errors, summary.prompts, summary.shards) == (2, 6, 8, 2)
    # batch_size auto (the default): the tiny model fits far more than max_batch_size (4) images.
    batch = next(m for m in logs if m.startswith("batch size"))
    assert batch.startswith("batch size 4 per replica (auto: ") and batch.endswith("; capped by max_batch_size)")
    assert summary.batch_size == 4 and json.loads((out / "_summary.json").read_text())["batch_size"] == 4

    images = pq.read_table(out / "data").to_pylist()
    assert sorted(r["id"] for r in images) == ["ok-1", "ok-2"]
    assert next(r for r in images if r["id"] == "ok-1")["label"] == 1  # the first ok-1 wins
    errors = {e["row"]: e for e in pq.read_table(out / "errors").to_pylist()}
    assert {row: e["reason"].split(":")[0] for row, e in errors.items()} == {
        2: "unknown class 42", 3: "malformed JSON line", 4: "missing id", 5: "duplicate id 'ok-1'",
        7: "unknown class -1", 8: "bad count 0"}
    assert errors[3]["raw"] == "{oops" and errors[2]["id"] == "bad-class" and errors[7]["file"] == str(src)
    manifest = Output(str(out)).committed()
    assert sorted((e["rows"], e["images"], e["errors"]) for e in manifest.values()) == [(2, 0, 2), (6, 2, 4)]
    assert not (out / "_tmp").exists()


def test_the_label_column_is_a_class_label_where_the_model_names_its_classes(tmp_path):
    datasets = pytest.importorskip("datasets")
    from lineray.images import png_bytes
    from lineray.pipelines.checks import class_names
    from lineray.pipelines.sink import image_schema, image_table

    digits = JobConfig.from_yaml(Path(__file__).resolve().parent.parent / "configs" / "jobs" / "digits.yaml")
    assert class_names(digits) == [str(d) for d in range(10)]
    assert class_names(JobConfig.from_dict(tiny_job("p.jsonl", "out"))) is None  # random weights: no names
    pixels = np.zeros((8, 8, 3), np.uint8)
    rows = [{"row": r, "image_index": 0, "id": f"x{r}", "label": r % 2, "text": "", "cfg_scale": 2.0, "count": 1,
             "seed": r, "width": 8, "height": 8, "png": png_bytes(pixels)} for r in (1, 2)]
    pq.write_table(image_table(rows, "m", "full", image_schema(["zero", "one"])), tmp_path / "part.parquet")
    hf = datasets.load_dataset("parquet", data_files=str(tmp_path / "part.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(hf.features["label"], datasets.ClassLabel) and hf.features["label"].names == ["zero", "one"]
    assert [hf.features["label"].int2str(v) for v in hf["label"]] == ["one", "zero"]
