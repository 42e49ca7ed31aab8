"""A node dies mid-job: two raylets in one process tree (ray.cluster_utils.Cluster, as Ray's own tests do),
the node holding a tp=2 replica's ranks is removed, and the job finishes on the other node."""
from __future__ import annotations

import shutil
import tempfile
import threading
from collections import Counter

import pytest
from conftest import wait_until
from pipeline_helpers import jsonl_bytes, tiny_job

from lineray.pipelines import JobConfig, run_job
from lineray.pipelines.sink import Output

pytestmark = pytest.mark.timeout(300)


def test_removing_the_node_of_a_replica_mid_job(tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lineray.cluster.local import bind_ray_to_loopback

    if ray.is_initialized():
        pytest.skip("needs its own Ray (another test module's Ray is still connected)")
    bind_ray_to_loopback()  # both raylets on 127.0.0.1
    temp = tempfile.mkdtemp(prefix="lr-nodes-", dir="/tmp")
    store = 128 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False,
                                                           "object_store_memory": store, "temp_dir": temp})
    worker = cluster.add_node(num_cpus=1, object_store_memory=store)
    context = DataContext.get_current()
    strategy = context.scheduling_strategy
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        head = ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=1.5)
        class Tenant:  # holds a head CPU until the replica's ranks have gone to the other node
            def ready(self):
                return True

        tenant = Tenant.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
        ray.get(tenant.ready.remote())
        # Stage actors and tasks prefer the driver's node, so only the ranks' placement group goes to the other one.
        context.scheduling_strategy = NodeAffinitySchedulingStrategy(head, soft=True)

        n = 12
        src = tmp_path / "p.jsonl"
        src.write_bytes(jsonl_bytes([{"id": f"n{i:02d}", "class": i % 10} for i in range(n)]))
        out = tmp_path / "out"
        job = JobConfig.from_dict(tiny_job(str(src), str(out), tp=2, batch_size=2, shard_rows=2,
                                           ray_address=cluster.address, stall_timeout_s=120))
        result = {}

        def run():
            try:
                result["summary"] = run_job(job, progress=False)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                result["error"] = e

        thread = threading.Thread(target=run)
        thread.start()

        def replica_group():
            for pg_id, pg in ray.util.placement_group_table().items():
                if pg["name"].startswith("lineray-tp2") and pg["state"] == "CREATED":
                    return pg_id, set(pg["bundles_to_node_id"].values())
            return None

        pg_id, nodes = wait_until(replica_group, 120, "the replica's placement group")
        assert nodes == {worker.node_id}, "the ranks should be on the second node (the head is full)"
        ray.kill(tenant)
        wait_until(lambda: Output(str(out)).committed() or "error" in result, 120, "a first commit")
        cluster.remove_node(worker)

        thread.join(timeout=240)
        assert not thread.is_alive(), "the job did not finish after the node was removed"
        assert "error" not in result, str(result.get("error"))[-2500:]
        summary = result["summary"]
        assert summary.total_images == n
        import pyarrow.parquet as pq
        ids = Counter(pq.read_table(out / "data")["id"].to_pylist())
        assert set(ids) == {f"n{i:02d}" for i in range(n)} and set(ids.values()) == {1}
        # The dead node's group was removed (not left to be rescheduled), and nothing of the job's is left.
        wait_until(lambda: ray.util.placement_group_table()[pg_id]["state"] == "REMOVED", 30,
                   "the dead node's placement group to be removed")
        # The replacement's group goes when its stage actor exits after the job (asynchronously: poll).
        wait_until(lambda: all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()), 60,
              f"every placement group of the job to be removed: "
              f"{[(pg['name'], pg['state']) for pg in ray.util.placement_group_table().values()]}")
    finally:
        context.scheduling_strategy = strategy
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
