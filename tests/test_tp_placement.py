"""A replica whose node does not exist yet waits for it (as on an autoscaling cluster), says what it
waits for, and starts when the node joins: a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`, loopback only) whose head node has no CPU for the ranks."""
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from lineray.cluster.local import bind_ray_to_loopback  # noqa: E402
from lineray.kernels.sampling import SamplingConfig  # noqa: E402
from lineray.models.generate import Condition, generate_tokens  # noqa: E402
from lineray.models import spec as model_spec  # noqa: E402
from lineray.models.spec import ModelSpec  # noqa: E402
from lineray.workers.config import ReplicaConfig  # noqa: E402
from lineray.workers.tp_replica import ReplicaError, TPOptions, TPReplica  # noqa: E402

# Random weights: checkpoint/decoder "random" in issue 12's ModelSpec, None before it.
RANDOM = getattr(model_spec, "RANDOM", None)
TINY = ModelSpec(preset="GPT-tiny", checkpoint=RANDOM, decoder=RANDOM, grid_size=8)
CFG = ReplicaConfig(model=TINY, sampling=SamplingConfig(cfg_scale=4.0), tp=2)
NODE = dict(node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)


@pytest.fixture
def cluster_with_a_cpu_less_head(monkeypatch):
    assert not ray.is_initialized(), "another test left Ray running"
    bind_ray_to_loopback()
    # Cluster records its address in /tmp/ray/ray_current_cluster, where another user's
    # ray.init("auto") on this machine would find it: keep it private.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **kw: None)
    temp_dir = tempfile.mkdtemp(prefix="lr-pg-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False,
                                                                temp_dir=temp_dir, **NODE))
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(240)
def test_a_replica_waits_for_its_node_reporting_and_starts_when_it_joins(cluster_with_a_cpu_less_head, caplog):
    cluster = cluster_with_a_cpu_less_head
    caplog.set_level(logging.WARNING, logger="lineray.workers.tp_replica")
    opts = TPOptions(cpus_per_rank=0.5, placement_report_s=1, poll_s=0.05, setup_timeout_s=120)

    # Asked to, it gives up after a deadline, saying what it could not get.
    with pytest.raises(ReplicaError, match=r"could not reserve 2 bundles of \{CPU: 0.5\} on one node within 1s "
                                           r"\(cluster: 1 node\(s\), free \{CPU: 0\}, largest node \{CPU: 0\}\)"):
        TPReplica(CFG, TPOptions(cpus_per_rank=0.5, placement_timeout_s=1, placement_report_s=1))

    # By default it waits as long as it takes, with a line every placement_report_s.
    waiting = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(TPReplica, CFG, opts)
        deadline = time.monotonic() + 60
        while len(waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert len(waiting) >= 3 and not future.done()
        assert "for 2 bundles of {CPU: 0.5} on one node (cluster: 1 node(s), free {CPU: 0}" in waiting[-1]
        node = cluster.add_node(num_cpus=2, **NODE)
        replica = future.result(timeout=180)
    with replica:
        assert {r.node_id for r in replica.ranks} == {node.node_id}
        cond, seeds = Condition.classes([1, 7]), [3, 4]
        want = generate_tokens(TINY.build_model(), cond, seeds, sampling=CFG.sampling).tokens
        assert torch.equal(replica.generate(cond, seeds), want)
