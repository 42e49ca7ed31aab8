"""Job submission through Ray's JobSubmissionClient, against a local Ray head with its dashboard on loopback.

Needs the dashboard's packages (`pip install "ray[default]"`); skipped without them.
"""
from __future__ import annotations

import tempfile

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import free_port, jsonl_bytes, tiny_job

from lineray.cluster import submit as jobs

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def dashboard():
    import ray
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.skip("the Ray dashboard (ray[default]) is not installed; job submission needs it")
    if ray.is_initialized():
        pytest.skip("another Ray session is open in this process")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _node_ip_address="127.0.0.1", object_store_memory=256 * 2**20,
             _temp_dir=tempfile.mkdtemp(prefix="lr-submit-", dir="/tmp"))
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()


def test_submit_status_logs(dashboard, tmp_path):
    import sys

    src = tmp_path / "p.jsonl"
    src.write_bytes(jsonl_bytes([{"id": f"s{i}", "class": i} for i in range(6)]))
    job_id = jobs.submit(tiny_job(str(src), str(tmp_path / "out")), dashboard, python=sys.executable)
    assert jobs.status(job_id, dashboard) in {"PENDING", "RUNNING", "SUCCEEDED"}
    assert jobs.wait(job_id, dashboard, timeout=300) == "SUCCEEDED", jobs.logs(job_id, dashboard)[-3000:]
    assert "6 images from 6 prompts" in jobs.logs(job_id, dashboard)
    assert sorted(pq.read_table(tmp_path / "out" / "data")["id"].to_pylist()) == [f"s{i}" for i in range(6)]
    assert jobs.stop(job_id, dashboard) is False  # already finished

    # A job that cannot start fails on the cluster with its one-line reason in the logs.
    bad = jobs.submit(tiny_job(str(tmp_path / "missing.jsonl"), str(tmp_path / "out2")), dashboard,
                      python=sys.executable)
    assert jobs.wait(bad, dashboard, timeout=300) == "FAILED"
    assert "error: prompt source not found" in jobs.logs(bad, dashboard)
