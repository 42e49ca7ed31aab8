"""Job submission through Ray's JobSubmissionClient, against a local Ray head with its dashboard on loopback.

Needs the dashboard's packages (`pip install "ray[default]"`); skipped without them.
"""
from __future__ import annotations

import tempfile

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import free_port, jsonl_bytes, tiny_job

from lineray.cluster import submit as jobs
from lineray.pipelines import JobConfig

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def dashboard():
    """A Ray head of our own (ray.cluster_utils, as Ray's tests do) with its dashboard and job agent on
    loopback ports the OS picks: the agent's default port (52365) may belong to another Ray on this machine."""
    import ray
    from ray._private.utils import get_dashboard_dependency_error
    from ray.cluster_utils import Cluster

    if get_dashboard_dependency_error() is not None:
        pytest.skip("the Ray dashboard (ray[default]) is not installed; job submission needs it")
    from lineray.cluster.local import bind_ray_to_loopback
    bind_ray_to_loopback()  # its processes (the job agent too) inherit it: every server on 127.0.0.1
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        dashboard_agent_listen_port=free_port(), node_ip_address="127.0.0.1", object_store_memory=256 * 2**20,
        temp_dir=tempfile.mkdtemp(prefix="lr-submit-", dir="/tmp")))
    ray.init(address=cluster.address)
    yield f"http://127.0.0.1:{port}"
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_submit_follow_status_logs(dashboard, tmp_path):
    import sys

    src = tmp_path / "p.jsonl"
    src.write_bytes(jsonl_bytes([{"id": f"s{i}", "class": i} for i in range(6)]))
    job = JobConfig.from_dict(tiny_job(str(src), str(tmp_path / "out")))
    job_id = jobs.submit(job, dashboard, python=sys.executable)
    assert jobs.status(job_id, dashboard) in {"PENDING", "RUNNING", "SUCCEEDED"}
    # follow streams the driver's output while the job runs: chunks arrive before the job has ended
    chunks, states = [], []
    state = jobs.follow(job_id, dashboard, write=lambda text: (chunks.append(text), states.append(
        jobs.status(job_id, dashboard))))
    assert state == "SUCCEEDED", "".join(chunks)[-3000:]
    assert "6 images from 6 prompts" in "".join(chunks)
    assert len(chunks) > 1 and "RUNNING" in states[:-1], states
    assert "6 images from 6 prompts" in jobs.logs(job_id, dashboard)
    assert sorted(pq.read_table(tmp_path / "out" / "data")["id"].to_pylist()) == [f"s{i}" for i in range(6)]
    assert jobs.stop(job_id, dashboard) is False  # already finished

    # A job that cannot start fails on the cluster with its one-line reason in the logs.
    bad = jobs.submit(JobConfig.from_dict(tiny_job(str(tmp_path / "missing.jsonl"), str(tmp_path / "out2"))),
                      dashboard, python=sys.executable)
    assert jobs.wait(bad, dashboard, timeout=300) == "FAILED"
    assert "error: prompt source not found" in jobs.logs(bad, dashboard)
