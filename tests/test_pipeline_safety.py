"""What a job must never do (issue 11): delete files it did not write, count a damaged shard, succeed on
a file it cannot read, hang on a resource plan, answer a storage mistake with a traceback, leave temp folders."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_helpers import S3Server, csv_bytes, jsonl_bytes, put, ray_session, s3, tiny_job  # noqa: F401

from lineray.pipelines import JobConfig, JobConfigError, run_job
from lineray.pipelines.sink import Output

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent


def _prompts(tmp_path, n: int, name: str = "p.jsonl") -> Path:
    src = tmp_path / name
    src.write_bytes(jsonl_bytes([{"id": f"i{k:03d}", "class": k % 10} for k in range(n)]))
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. ownership --------------------------------------------------------------------------------
def test_a_foreign_output_is_refused_and_left_as_it_was(tmp_path):
    src = _prompts(tmp_path, 4)
    out = tmp_path / "theirs"
    (out / "data").mkdir(parents=True)
    (out / "errors").mkdir()
    (out / "data" / "part-00000.parquet").write_bytes(b"someone else's data")
    (out / "errors" / "part-00000.parquet").write_bytes(b"someone else's errors")
    (out / "notes.txt").write_text("keep me")
    before = _files(out)
    with pytest.raises(JobConfigError) as e:
        run_job(JobConfig.from_dict(tiny_job(str(src), str(out))), progress=False)
    msg = str(e.value)
    assert "not a lineray output" in msg and "data/part-00000.parquet" in msg and "notes.txt" in msg
    assert "--overwrite" in msg and "\n" not in msg
    assert _files(out) == before  # nothing deleted, nothing added


def test_resume_deletes_only_what_the_job_proves_it_wrote(ray_session, tmp_path):
    src = _prompts(tmp_path, 8)
    out = tmp_path / "out"
    job = JobConfig.from_dict(tiny_job(str(src), str(out)))
    run_job(job, progress=False)
    out_ = Output(str(out))
    committed = out_.committed()
    key = sorted(committed)[1]
    # A crash between a shard's data file and its manifest entry: the in-flight record proves the file is ours.
    data = out / "data" / f"part-{key}.parquet"
    out_.begin_shard(key)
    (out / "_manifest" / f"{key}.json").unlink()
    data.write_bytes(b"half a file")
    # Files nobody of this job wrote: a foreign file in data/ and in the root, and a stray temp-looking file.
    (out / "data" / "their-table.parquet").write_bytes(b"theirs")
    (out / "README.txt").write_text("theirs")
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "not-ours.bin").write_bytes(b"theirs")
    logs = []
    summary = run_job(job, progress=False, log=logs.append)
    assert (summary.images, summary.total_images) == (4, 8)
    assert (out / "data" / "their-table.parquet").read_bytes() == b"theirs"
    assert (out / "README.txt").read_text() == "theirs" and (out / "_tmp" / "not-ours.bin").exists()
    assert pq.read_table(data).num_rows == 4
    assert any("their-table.parquet" in m and "not this job's" in m for m in logs), logs


# -- 2. checksummed commits ----------------------------------------------------------------------------
def test_a_damaged_shard_is_found_and_regenerated(ray_session, tmp_path):
    src = _prompts(tmp_path, 8)
    out = tmp_path / "out"
    job = JobConfig.from_dict(tiny_job(str(src), str(out)))
    run_job(job, progress=False)
    entries = Output(str(out)).committed()
    for entry in entries.values():  # size and checksum of every file the shard committed
        for meta in entry["files"].values():
            assert meta["size"] > 0 and len(meta["sha256"]) == 64
    key = sorted(entries)[0]
    data = out / "data" / f"part-{key}.parquet"
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # truncated after its commit
    logs = []
    again = run_job(job, progress=False, log=logs.append)
    assert again.repaired_shards == [key] and again.images == 4 and again.total_images == 8
    assert any(key in m and "damaged" in m and "size" in m for m in logs), logs
    assert pq.read_table(data).num_rows == 4

    # Same size, other bytes: only --verify (the checksum) finds it.
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    data.write_bytes(bytes(flipped))
    assert run_job(job, progress=False).repaired_shards == []
    fixed = run_job(job.replace(verify=True), progress=False)
    assert fixed.repaired_shards == [key] and pq.read_table(data).num_rows == 4


# -- 3. column mapping and the error budget --------------------------------------------------------------
def test_a_renamed_class_column_is_mapped_or_refused_with_exit_3(ray_session, tmp_path):
    rows = [{"id": f"c{k}", "class_label": k % 10} for k in range(6)]
    src = tmp_path / "imagenet.csv"
    src.write_bytes(csv_bytes(rows, ["id", "class_label"]))
    job = tiny_job(str(src), str(tmp_path / "out"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = subprocess.run([sys.executable, "-m", "lineray.cli", "generate", str(path)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert proc.returncode == 3, proc.stderr
    assert "6 of 6 rows rejected" in proc.stderr and "missing class" in proc.stderr
    assert "--column class=NAME" in proc.stderr and "class_label" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written

    summary = run_job(JobConfig.from_dict(job | {"columns": {"class": "class_label"}}), progress=False)
    assert summary.images == 6
    labels = pq.read_table(tmp_path / "out" / "data").to_pydict()
    assert sorted(zip(labels["id"], labels["label"])) == [(f"c{k}", k % 10) for k in range(6)]


def test_too_many_bad_rows_stop_the_job_early(tmp_path):
    from lineray.pipelines.rejects import TooManyBadRows

    rows = [{"id": f"r{k}", "class": k % 10 if k % 3 == 0 else 99} for k in range(60)]
    src = tmp_path / "mostly-bad.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    job = JobConfig.from_dict(tiny_job(str(src), str(tmp_path / "out"), error_check_rows=20,
                                       max_error_fraction=0.5))
    with pytest.raises(TooManyBadRows) as e:
        run_job(job, progress=False)
    assert "unknown class 99" in str(e.value) and "max_error_fraction 0.5" in str(e.value)


# -- 4. a resource plan that cannot deadlock ------------------------------------------------------------------
def test_the_plan_counts_every_stage_adapts_and_refuses_with_numbers():
    from lineray.pipelines.plan import ClusterShape, PlanError, plan_job

    job = JobConfig.from_dict(tiny_job("p.jsonl", "out", replicas=2))
    two = ClusterShape.single(cpus=2)
    plan = plan_job(job, two)
    # 2 replicas x 0.5 + decode 0.25 + read 0.25 + png 0.25 + Ray Data's repartition task 1 = 2.75 > 2:
    # the fractional asks shrink together (the repartition task's 1 CPU cannot).
    assert plan.replicas == 2 and plan.cpus_needed <= 2 and plan.stage("repartition").cpus == 1
    assert plan.adapted == ("fractional CPU asks x0.57 to fit 2 CPU",)
    assert {s.name for s in plan.stages} == {"read", "repartition", "generate", "decode", "png"}
    # Whole-CPU replicas do not shrink: fewer replicas.
    whole = plan_job(job.replace(resources=job.resources.__class__(generate_cpus=1.0)), ClusterShape.single(cpus=3))
    assert whole.replicas == 1 and "replicas 2 -> 1" in whole.adapted and whole.cpus_needed <= 3
    with pytest.raises(PlanError) as e:
        plan_job(job.replace(tp=2, resources=job.resources), ClusterShape.single(cpus=1))
    assert "needs" in str(e.value) and "CPU" in str(e.value)
    # GPUs: 8 one-GPU replicas and decoders on an 8-GPU node: the decoders get a share of the generators' GPUs.
    gpu = JobConfig.from_dict(tiny_job("p.jsonl", "out", replicas=8, device="cuda", batch_size=4,
                                       resources={"decoders": 2}))
    plan = plan_job(gpu, ClusterShape.single(cpus=32, gpus=8))
    assert plan.replicas == 8 and plan.decode_device == "cuda"
    assert 8 * plan.generate_gpus + 2 * plan.decode_gpus <= 8 and plan.generate_gpus + plan.decode_gpus <= 1
    t2i = plan_job(gpu, ClusterShape.single(cpus=32, gpus=8), text_stage=True)  # T5 on a GPU share too
    assert t2i.text_device == "cuda" and t2i.generate_gpus + max(t2i.decode_gpus, t2i.text_gpus) <= 1
    # tp=2 ranks hold whole GPUs in their placement groups: with none left, the decoders run on CPU.
    ranks = plan_job(gpu.replace(tp=2, replicas=4), ClusterShape.single(cpus=32, gpus=8))
    assert ranks.replicas == 4 and ranks.decode_device == "cpu" and "decoders on CPU" in ranks.line()
    with pytest.raises(PlanError, match="has no GPU"):
        plan_job(gpu, ClusterShape.single(cpus=32))


def test_a_private_rays_object_store_is_sized_from_the_machine():
    from lineray.cluster.local import MIN_STORE_MB, available_memory, object_store_mb_for_machine

    mb = object_store_mb_for_machine()
    assert MIN_STORE_MB <= mb and (mb == MIN_STORE_MB or mb * 2**20 <= 0.2 * available_memory() + 2**20)


def test_a_two_cpu_private_ray_with_two_replicas_finishes(tmp_path):
    """Issue 11's hang: replicas 2 with fractional CPUs on a 2-CPU private Ray sat at 0 shards forever
    (the actors took every CPU; Ray Data's repartition task needs one). Its own process: its own private Ray."""
    src = _prompts(tmp_path, 8)
    out = tmp_path / "out"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(str(src), str(out), replicas=2, stall_timeout_s=60, resources={
        "generate_cpus": 0.75, "decode_cpus": 0.25, "read_cpus": 0.25, "png_cpus": 0.25})))
    proc = subprocess.run([sys.executable, "-m", "lineray.cli", "generate", str(path), "--num-cpus", "2"],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapted: fractional CPU asks x0.44 to fit 2 CPU" in proc.stderr, proc.stderr
    assert pq.read_table(out / "data").num_rows == 8


def test_no_progress_is_detected_and_names_the_stuck_stage(ray_session, tmp_path):
    import ray

    from lineray.pipelines.monitor import JobStalled

    @ray.remote(num_cpus=3.5)
    class Tenant:  # another job that holds most of the cluster for longer than ours waits
        def ready(self):
            return True

    tenant = Tenant.remote()
    ray.get(tenant.ready.remote())
    try:
        job = JobConfig.from_dict(tiny_job(str(_prompts(tmp_path, 4)), str(tmp_path / "out"), stall_timeout_s=8))
        with pytest.raises(JobStalled) as e:
            run_job(job, progress=False)
        msg = str(e.value)
        assert re.match(r"no progress for \d+ s: stage \w+", msg) and "of 4 CPU available now" in msg, msg
        assert any(stage in msg for stage in ("generate", "decode", "repartition", "png")), msg
    finally:
        ray.kill(tenant)


# -- 5. one-line errors that name the URL, key or file ---------------------------------------------------------
def test_storage_mistakes_are_one_line_errors_naming_the_place(s3, tmp_path, monkeypatch):
    from lineray.pipelines.storage import StorageError

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    src = put(s3, "prompts/ok.jsonl", jsonl_bytes([{"id": "a", "class": 1}]))

    def error(**kw) -> str:
        with pytest.raises((StorageError, JobConfigError)) as e:
            run_job(JobConfig.from_dict(tiny_job(**({"source": src, "output": "s3://bucket/out/x",
                                                    "storage_options": s3.options} | kw))), progress=False)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
        return str(e.value)

    assert "s3://no-such-bucket" in error(output="s3://no-such-bucket/out") and "bucket" in error(
        output="s3://no-such-bucket/out")
    msg = error(storage_options=s3.options | {"endpoint_ur": s3.endpoint})
    assert "endpoint_ur" in msg and "storage_options" in msg
    msg = error(storage_options={"endpoint_url": s3.endpoint})
    assert "credentials" in msg and "s3://bucket" in msg

    # An empty manifest entry (a damaged commit record) names its file.
    out = Output("s3://bucket/out/m", s3.options)
    out.write_json(out.path("_job.json"), {})
    out.fs.pipe_file(out.manifest_path("p.jsonl-0-1"), b"")
    with pytest.raises(StorageError) as e:
        out.committed()
    assert "_manifest/p.jsonl-0-1.json" in str(e.value) and "empty" in str(e.value)


# -- 6. no leftovers --------------------------------------------------------------------------------------------
def test_a_private_ray_leaves_no_temp_folder(tmp_path):
    code = textwrap.dedent("""
        import ray
        from lineray.cluster.local import ray_session
        with ray_session(num_cpus=1):
            assert ray.get(ray.remote(lambda: 1).remote()) == 1
            print(ray._private.worker._global_node.get_temp_dir_path())
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    temp = Path(proc.stdout.strip().splitlines()[-1])
    assert temp.name.startswith("lineray-ray-") and not temp.exists()
