"""Tensor-parallel replicas on a private local Ray: real actors, placement groups and gloo.

GPT-tiny (4 heads) at an 8x8 grid, fp32, CFG on: tp=2 must give tp=1's tokens and
logits, hold half the K/V and half the split weights per rank, survive or report a
killed worker, never hang on a stopped one, and leave no actor or placement group.
"""
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import psutil
import pytest
import torch

ray = pytest.importorskip("ray")
from ray.util import list_named_actors, placement_group_table  # noqa: E402
from conftest import wait_until  # noqa: E402

from lineray.cache import CacheSpec  # noqa: E402
from lineray.cluster.local import ensure_ray  # noqa: E402
from lineray.kernels.sampling import SamplingConfig  # noqa: E402
from lineray.models.generate import Condition, GenerationError, generate_tokens  # noqa: E402
from lineray.models.spec import ModelSpec  # noqa: E402
from lineray.workers.instrumented import InstrumentedTPReplica  # noqa: E402
from lineray.workers.replica import ReplicaConfig, make_replica  # noqa: E402
from lineray.workers.tp_replica import ReplicaError, TPOptions, TPReplica  # noqa: E402
from lineray.workers.worker import TPWorker, weight_bytes  # noqa: E402

TINY = ModelSpec(preset="GPT-tiny", checkpoint="random", decoder="random", grid_size=8)
SAMPLING = SamplingConfig(cfg_scale=4.0, temperature=1.0)
LINEAR = CacheSpec(policy="linear", lines=3)  # evicts: 3 of 8 lines kept
COND = Condition.classes([1, 7, 3])
SEEDS = [11, 12, 13]
FAST = TPOptions(poll_s=0.05, ping_timeout_s=5.0, stall_timeout_s=30.0, setup_timeout_s=120.0)
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def ray_local():
    assert not ray.is_initialized(), "another test left Ray running"
    temp_dir = tempfile.mkdtemp(prefix="lr-tp-", dir="/tmp")  # short: Ray's socket paths have a length limit
    started = ensure_ray(num_cpus=2, temp_dir=temp_dir)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def reference(spec: ModelSpec, cache: CacheSpec):
    """tp=1 in this process: tokens, guided logits, K/V bytes, (all, sharded) weight bytes."""
    model = spec.build_model()
    out = generate_tokens(model, COND, SEEDS, sampling=SAMPLING, cache_spec=cache, return_logits=True)
    return out.tokens, out.logits, out.cache.memory().kv_bytes, weight_bytes(model)


def config(spec=TINY, cache=CacheSpec(), tp=2) -> ReplicaConfig:
    return ReplicaConfig(model=spec, cache=cache, sampling=SAMPLING, tp=tp)


def assert_gone(pg_id: str, worker_names: list[str], pids: list[int]) -> None:
    """The replica's placement group is removed, none of its actors is alive, their processes have exited.

    Asked of the GCS (`placement_group_table`, `list_named_actors`): ray.util.state's
    list_placement_groups/list_actors go through the dashboard, which a private test Ray does not run.
    """
    assert pg_id and len(worker_names) == len(pids) == 2

    def gone():
        pg = placement_group_table().get(pg_id, {})
        alive = {a["name"] for a in list_named_actors(all_namespaces=True)}
        return (pg.get("state") == "REMOVED" and not alive & set(worker_names)
                and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids))
    wait_until(gone, what=f"placement group {pg_id} and workers {worker_names} to go")


def listening_addresses() -> dict[int, set[str]]:
    """pid -> listening TCP addresses, for this process and every process it started (Ray's, the workers)."""
    out = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ips = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
        if ips:
            out[proc.pid] = ips
    return out


# -- construction ------------------------------------------------------------------

def test_bad_tp_is_refused_with_the_valid_sizes():
    with pytest.raises(ValueError, match=r"tp=3 .*4 attention heads.*valid tensor-parallel sizes are 1, 2, 4"):
        make_replica(config(tp=3))
    with pytest.raises(ValueError, match=r"valid tensor-parallel sizes are 1, 2, 3, 4, 6, 12"):
        TPReplica(config(spec=ModelSpec(preset="GPT-B", checkpoint="random", decoder="random"), tp=5))


# -- equality, memory, failure and cleanup on one replica ------------------------------

@pytest.mark.timeout(240)
def test_tp2_full_cache_matches_tp1_holds_half_recovers_and_cleans_up(ray_local):
    tokens, logits, kv_bytes, (w_all, w_sharded) = reference(TINY, CacheSpec())
    replica = InstrumentedTPReplica(config())  # a TPReplica that can also return logits and timings
    with replica:
        got, got_logits = replica.generate_with_logits(COND, SEEDS)
        assert torch.equal(got, tokens)
        assert (got_logits - logits).abs().max().item() < 1e-4

        # Each rank holds its heads' K/V and its slice of every split layer.
        ranks = replica.rank_info()
        assert len({r.pid for r in ranks}) == 2 and len({r.node_id for r in ranks}) == 1
        for r in ranks:
            assert r.kv.kv_bytes * 2 == kv_bytes and r.kv.heads == 2
            assert r.sharded_weight_bytes * 2 == w_sharded
            assert r.replicated_weight_bytes == w_all - w_sharded
        assert replica.memory() == ranks[0].kv
        timing = replica.time_batch(COND, SEEDS)[0]
        assert timing["steps"] == 64 and timing["all_reduce_calls"] == 64 * 2 * 2  # 2 layers x 2 per step
        assert timing["all_gather_calls"] == 64  # the logits, once per step

        # Everything this test started listens on loopback only (Ray, its workers, gloo, the TCP store).
        listening = listening_addresses()
        assert {r.pid for r in ranks} <= set(listening)
        for pid, ips in listening.items():
            assert ips <= LOOPBACK, f"pid {pid} ({psutil.Process(pid).name()}) listens on {sorted(ips)}"

        # Kill rank 1 mid-batch: the replica rebuilds itself and the retried batch is the same.
        victim = ranks[1].pid
        first = replica.placement_group_id, replica.worker_names, [r.pid for r in ranks]
        steps = []

        def kill_once(i):
            steps.append(i)
            if i == 10 and psutil.pid_exists(victim):
                os.kill(victim, signal.SIGKILL)

        again = replica.generate(COND, SEEDS, on_step=kill_once)
        assert torch.equal(again, tokens)
        assert replica.rebuilds == 1
        assert steps == list(range(64)), "on_step reports each token once, in order, across the retry"
        assert replica.placement_group_id != first[0]
        assert_gone(*first)  # the broken group was cleaned up
        live = replica.placement_group_id, replica.worker_names, [r.pid for r in replica.ranks]
    assert replica.placement_group_id is None and replica.worker_names == [] and replica.memory() is None
    with pytest.raises(ReplicaError, match="has been shut down"):
        replica.generate(COND, SEEDS)
    assert_gone(*live)


@pytest.mark.timeout(180)
def test_tp2_linear_cache_from_a_checkpoint_matches_tp1(ray_local, tmp_path):
    # Weights on disk in the published layout; each rank reads only its slices.
    model = TINY.build_model()
    path = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    spec = TINY.replace(checkpoint=str(path))
    tokens, logits, kv_bytes, (_, w_sharded) = reference(spec, LINEAR)
    with InstrumentedTPReplica(config(spec=spec, cache=LINEAR), FAST) as replica:
        got, got_logits = replica.generate_with_logits(COND, SEEDS)
        assert torch.equal(got, tokens)
        assert (got_logits - logits).abs().max().item() < 1e-4
        for r in replica.rank_info():
            assert r.kv.kv_bytes * 2 == kv_bytes
            assert r.sharded_weight_bytes * 2 == w_sharded
        # A second batch of another size reuses nothing stale; bad input is refused, the group stays up.
        two = replica.generate(COND.select([2, 0]), [SEEDS[2], SEEDS[0]])
        assert torch.equal(two, tokens[[2, 0]])
        with pytest.raises(GenerationError, match="need one seed per image: 3 images, 1 seeds"):
            replica.generate(COND, SEEDS[:1])
        with pytest.raises(GenerationError, match="class id 10 is out of range"):
            replica.generate(Condition.classes([10]), [0])
        assert replica.rebuilds == 0 and replica.worker_names
        live = replica.placement_group_id, replica.worker_names, [r.pid for r in replica.ranks]
    assert_gone(*live)


@pytest.mark.timeout(180)
def test_a_killed_or_stopped_worker_is_reported_not_waited_on(ray_local):
    opts = TPOptions(poll_s=0.05, ping_timeout_s=2.0, stall_timeout_s=30.0, setup_timeout_s=120.0, max_retries=0)
    replica = TPReplica(config(), opts)
    try:
        # A stopped (hung) rank stops answering pings: the batch fails in seconds, naming the rank.
        victim = replica.ranks[1].pid
        stopped = []

        def stop(i):
            if i == 5 and not stopped:
                os.kill(victim, signal.SIGSTOP)
                stopped.append(time.monotonic())

        with pytest.raises(ReplicaError, match=rf"rank 1 \(pid {victim}\) did not answer a ping within 2s"):
            replica.generate(COND, SEEDS, on_step=stop)
        assert time.monotonic() - stopped[0] < 20
        wait_until(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
                   what="the stopped worker to be killed")

        # The next batch starts a fresh group; a rank killed during it fails it with a clear error that
        # names the rank that died, not rank 0, whose collective then fails ("connection reset by peer").
        victim = None

        def kill(i):
            nonlocal victim
            if i == 5 and victim is None:
                victim = replica.ranks[1].pid
                os.kill(victim, signal.SIGKILL)

        with pytest.raises(ReplicaError) as failed:
            replica.generate(COND, SEEDS, on_step=kill)
        assert re.search(rf"batch failed 1 time\(s\), giving up: rank 1 \(pid {victim}\) died during "
                         r"(generate|ping)", str(failed.value)), str(failed.value)
        assert "rank 0" not in str(failed.value).split("(then")[0]
        assert replica.placement_group_id is None  # torn down, not left half-alive
    finally:
        for info in replica.ranks:  # never leave a stopped process behind, whatever failed
            if psutil.pid_exists(info.pid):
                os.kill(info.pid, signal.SIGCONT)
        replica.shutdown()


class WedgedWorker(TPWorker):
    """Rank 1 stops in the middle of a batch without dying: it still answers pings, and rank 0 waits
    in a collective for it (as a GPU stuck in a kernel, or a collective whose peer never comes)."""

    def _generate(self, *args, on_step=None, **kw):
        def wedge(i):
            if self.rank == 1 and i == 5:
                time.sleep(600)
        return super()._generate(*args, on_step=wedge, **kw)


class WedgedReplica(TPReplica):
    worker_class = WedgedWorker


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


@pytest.mark.timeout(180)
def test_a_rank_that_answers_pings_but_makes_no_progress_fails_the_batch(ray_local):
    opts = TPOptions(poll_s=0.05, ping_timeout_s=5.0, stall_timeout_s=3.0, setup_timeout_s=120.0, max_retries=0)
    with WedgedReplica(config(), opts) as replica:
        t0 = time.monotonic()
        with pytest.raises(ReplicaError, match=r"no token finished on every rank's device for 3s "
                                               r"\(stuck at token 6/64\)"):
            replica.generate(COND, SEEDS)
        assert time.monotonic() - t0 < 30  # the watchdog, not the 60 s collective timeout
        assert replica.placement_group_id is None


@ray.remote(num_cpus=0.1)
class ReplicaOwner:
    """Stands in for a Ray Data stage actor that owns a replica."""

    def __init__(self, cfg):
        self.replica = TPReplica(cfg, FAST)

    def generate(self, cond, seeds):
        return self.replica.generate(cond, seeds)

    def ids(self):
        r = self.replica
        return r.placement_group_id, r.worker_names, [info.pid for info in r.ranks]


@pytest.mark.timeout(180)
def test_replica_created_inside_an_actor_works_and_is_removed_with_it(ray_local):
    tokens = reference(TINY, CacheSpec())[0]
    owner = ReplicaOwner.remote(config())
    assert torch.equal(ray.get(owner.generate.remote(COND, SEEDS), timeout=120), tokens)
    live = ray.get(owner.ids.remote(), timeout=30)
    del owner  # the last handle: Ray ends the actor gracefully (as Ray Data does); no shutdown() call
    assert_gone(*live)
