"""Resume: kill the job's driver mid-run and rerun (every image exactly once); crash leftovers; wrong resumes."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_helpers import TINY_MODEL, jsonl_bytes, put, ray_session, read_dataset, s3, tiny_job  # noqa: F401

from lineray.pipelines import JobConfig, JobConfigError, run_job
from lineray.pipelines.sink import Output
from lineray.pipelines.sources import shard_key

pytestmark = pytest.mark.timeout(300)


def _processes_under(temp_dir: str) -> list[int]:
    """PIDs whose command line names a Ray temp dir (what a private Ray started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_resume_after_killing_the_driver(ray_session, s3, tmp_path):
    """SIGKILL the driver and the Ray it started mid-job, rerun: no image lost, none written twice."""
    n = 32  # 8 shards of 4
    source = put(s3, "prompts/kill.jsonl", jsonl_bytes([{"id": f"k{i:03d}", "class": i % 10} for i in range(n)]))
    job = tiny_job(source, "s3://bucket/out/kill", storage_options=s3.options, model=dict(TINY_MODEL, grid_size=8))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = Output("s3://bucket/out/kill", s3.options)
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-m", "lineray.cli", "generate", str(path), "--num-cpus", "3",
                             "--verbose"],  # Ray's own lines (its temp dir) on stderr
                            env=dict(os.environ, RAY_AUTH_MODE="disabled"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    done = {}
    try:
        deadline = time.time() + 150
        while not done and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            done = out.committed()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process of its private Ray (one group)
        proc.wait(timeout=30)
    assert done, f"no shard was committed; driver log:\n{log.read_text()[-3000:]}"
    assert len(done) < n // 4, "the job finished before it could be killed"

    # Nothing of the killed Ray may linger (its processes name its temp dir).
    temp = re.search(r"(/tmp/lineray-ray-[A-Za-z0-9_]+)", log.read_text())
    assert temp, f"the driver log does not name its Ray's temp dir:\n{log.read_text()[-2000:]}"
    deadline = time.time() + 30
    while _processes_under(temp.group(1)) and time.time() < deadline:
        time.sleep(0.5)
    left = _processes_under(temp.group(1))
    for pid in left:  # clean up what the assertion below reports
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp.group(1), ignore_errors=True)  # a SIGKILLed driver cannot remove its Ray's temp dir
    assert not left, f"processes of the killed job's Ray survived: {left}"

    # Resume with another batch size (the killed run had auto = 4): the images do not depend on it.
    summary = run_job(JobConfig.from_dict(job | {"batch_size": 3}), progress=False)
    assert summary.skipped_shards == len(done) and summary.total_images == n and summary.batch_size == 3
    ids = Counter(read_dataset(s3.fs(), "bucket/out/kill")["id"].to_pylist())
    assert set(ids) == {f"k{i:03d}" for i in range(n)} and set(ids.values()) == {1}
    assert len(out.committed()) == n // 4


def test_leftovers_are_redone_and_a_different_job_is_refused(ray_session, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_bytes(jsonl_bytes([{"id": f"x{i}", "class": i} for i in range(6)]))
    out = tmp_path / "out"
    job = JobConfig.from_dict(tiny_job(str(src), str(out)))
    # What a crash can leave: a temp file of ours, and a data file of a shard that was begun but never committed.
    key = shard_key("p.jsonl", 1)
    Output(str(out)).write_json(str(out / "_job.json"), {"fingerprint": job.fingerprint()})
    Output(str(out)).begin_shard(key)
    (out / "_tmp").mkdir(parents=True, exist_ok=True)
    (out / "_tmp" / f"{'0' * 32}-part-x.parquet").write_bytes(b"partial")
    (out / "data").mkdir()
    (out / "data" / f"part-{key}.parquet").write_bytes(b"partial")
    summary = run_job(job, progress=False)
    assert summary.total_images == 6
    assert sorted(p.name.split("-")[-1] for p in (out / "data").iterdir()) == ["0000000001.parquet",
                                                                               "0000000005.parquet"]
    assert pq.read_table(out / "data").num_rows == 6 and not (out / "_tmp").exists()
    assert not (out / "_inflight").exists() or not list((out / "_inflight").iterdir())

    with pytest.raises(JobConfigError, match="holds a job with different seed"):
        run_job(job.replace(seed=1), progress=False)
    redo = run_job(job.replace(seed=1), progress=False, overwrite=True)
    assert (redo.images, redo.skipped_shards) == (6, 0)

    # A data file named like a shard's but in no manifest entry or in-flight record is not ours: refused.
    (out / "data" / f"part-{shard_key('gone.jsonl', 1)}.parquet").write_bytes(b"theirs")
    with pytest.raises(JobConfigError, match="named like this job's shard files"):
        run_job(job.replace(seed=1), progress=False)
