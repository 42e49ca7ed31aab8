"""A tensor-parallel replica inside the job: the stage actor coordinates, its ranks live in a placement group."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import wait_until
from pipeline_helpers import jsonl_bytes, ray_session, tiny_job  # noqa: F401

from lineray.pipelines import JobConfig, run_job

pytestmark = pytest.mark.timeout(300)


def test_job_with_a_tp2_replica(ray_session, tmp_path):
    import ray

    src = tmp_path / "p.jsonl"
    src.write_bytes(jsonl_bytes([{"id": f"t{i}", "class": i % 10} for i in range(8)]))
    job = JobConfig.from_dict(tiny_job(str(src), str(tmp_path / "out"), tp=2, batch_size=4))
    summary = run_job(job, progress=False)
    assert summary.images == 8
    assert sorted(pq.read_table(tmp_path / "out" / "data")["id"].to_pylist()) == [f"t{i}" for i in range(8)]
    # The replica's placement group goes away with the stage actor that created it, and every CPU
    # comes back: both asynchronously (within ~0.1 s), so poll with a deadline.
    wait_until(lambda: all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values()),
               what="the placement groups to be removed")
    wait_until(lambda: ray.available_resources().get("CPU", 0) == pytest.approx(ray.cluster_resources()["CPU"], abs=0.3),
               what="the job's CPUs to come back")
