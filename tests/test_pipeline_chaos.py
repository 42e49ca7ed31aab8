"""Chaos: a job on S3 (moto) with bad rows, SIGKILLed three times, a shard damaged and a foreign file added.

At the end every valid id is in the dataset exactly once, every bad row is in errors/ once,
the foreign file is untouched, the damaged shard was done again, and the exit codes are the
documented ones (lineray.cli: 0 done, 1 failed while running).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml
from pipeline_helpers import TINY_MODEL, jsonl_bytes, put, s3, tiny_job  # noqa: F401

from lineray.pipelines.sink import Output

pytestmark = pytest.mark.timeout(420)
SEED = int(os.environ.get("LINERAY_CHAOS_SEED", "11"))  # where the kills fall; printed on failure


def _start(config: Path, log: Path, tmp: str) -> subprocess.Popen:
    # TMPDIR: what a SIGKILLed driver leaves (its Ray's temp dir, its console log) stays in the test's folder.
    return subprocess.Popen([sys.executable, "-m", "lineray.cli", "generate", str(config), "--quiet"],
                            env=dict(os.environ, RAY_AUTH_MODE="disabled", TMPDIR=tmp), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))


@pytest.fixture
def short_tmp():
    """A short temp dir (Ray's socket paths must stay under 107 bytes), removed after the test."""
    path = tempfile.mkdtemp(prefix="lrc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _wait_commits(out: Output, n: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(out.committed())
        if done >= n:
            return done
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before {n} commits:\n" \
                                    f"{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} commits after {timeout} s:\n{log.read_text()[-3000:]}")


def _ray_actor_pid(driver: subprocess.Popen, stage: str) -> int:
    """The PID of a Ray Data actor of `stage` in the Ray the driver started (its raylet is in the driver's group)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                group = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[2])
            except (OSError, ValueError, IndexError):
                continue
            if title.startswith(f"ray::MapWorker(MapBatches({stage}))") and group == driver.pid:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no {stage} actor found")


def _kill_job(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its private Ray's raylet/GCS (the workers follow them)
    proc.wait(timeout=30)


def test_chaos_kills_damage_and_a_foreign_file(s3, tmp_path, short_tmp):
    rng = random.Random(SEED)
    rows: list = [{"id": f"c{i:03d}", "class": i % 10} for i in range(98)]
    rows.insert(23, "{not json")  # row 24: malformed
    rows.insert(67, {"id": "c-bad", "class": 99})  # row 68: no such class
    valid = {f"c{i:03d}" for i in range(98)}
    source = put(s3, "prompts/chaos.jsonl", jsonl_bytes(rows))
    url = "s3://bucket/out/chaos"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(source, url, storage_options=s3.options, shard_rows=5,
                                              model=dict(TINY_MODEL, grid_size=8), stall_timeout_s=120)))
    out = Output(url, s3.options)
    logs = [tmp_path / f"run{i}.log" for i in range(3)]

    # 1. SIGKILL the driver (and its private Ray) after a random number of commits.
    run = _start(config, logs[0], short_tmp)
    _wait_commits(out, rng.randint(1, 3), run, logs[0])
    _kill_job(run)
    assert run.returncode == -signal.SIGKILL

    # 2. Rerun; SIGKILL a generator worker, then the decode actor: Ray Data restarts them, the batches are retried.
    run = _start(config, logs[1], short_tmp)
    before = len(out.committed())
    _wait_commits(out, before + rng.randint(1, 2), run, logs[1])
    os.kill(_ray_actor_pid(run, "GenerateStage"), signal.SIGKILL)
    _wait_commits(out, len(out.committed()) + rng.randint(1, 2), run, logs[1])
    os.kill(_ray_actor_pid(run, "DecodeStage"), signal.SIGKILL)
    code = run.wait(timeout=300)
    assert code in (0, 1), f"seed {SEED}: exit {code}\n{logs[1].read_text()[-3000:]}"  # 1: failed, rerun resumes

    # 3. Damage a committed part file; put someone else's file into the output.
    fs = s3.fs()
    entries = out.committed()
    damaged = sorted(k for k, e in entries.items() if e["images"])[rng.randrange(5)]
    part = f"bucket/out/chaos/data/part-{damaged}.parquet"
    fs.pipe_file(part, fs.cat_file(part)[:100])
    fs.pipe_file("bucket/out/chaos/data/NOTES.txt", b"not lineray's")

    # 4. The last rerun finishes the job and repairs the shard.
    run = _start(config, logs[2], short_tmp)
    assert run.wait(timeout=300) == 0, f"seed {SEED}:\n{logs[2].read_text()[-3000:]}"
    text = logs[2].read_text()
    assert f"shard {damaged} is damaged" in text and text.count("is damaged") == 1 and "NOTES.txt" in text
    # A quiet console: our few lines on stderr, Ray's and Ray Data's own output in the output's _logs/.
    assert len(text.splitlines()) <= 10 and " INFO " not in text, text
    ray_log = fs.glob("bucket/out/chaos/_logs/*.log")
    assert ray_log and f"Ray's output: s3://bucket/out/chaos/_logs/" in text
    assert b"Starting execution of Dataset" in b"".join(fs.cat_file(p) for p in ray_log)

    parts = fs.glob("bucket/out/chaos/data/*.parquet")
    ids = Counter(pads.dataset(parts, filesystem=fs, format="parquet").to_table()["id"].to_pylist())
    assert set(ids) == valid and set(ids.values()) == {1}, f"seed {SEED}: {ids.most_common(3)}"
    errors = pads.dataset("bucket/out/chaos/errors", filesystem=fs, format="parquet").to_table().to_pylist()
    assert sorted((e["row"], e["reason"].split(":")[0]) for e in errors) == [(24, "malformed JSON line"),
                                                                            (68, "unknown class 99")]
    assert fs.cat_file("bucket/out/chaos/data/NOTES.txt") == b"not lineray's"
    assert len(out.committed()) == 20 and not fs.exists("bucket/out/chaos/_inflight")
