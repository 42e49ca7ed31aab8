"""A tensor-parallel replica: tp Ray worker actors in one placement group, driven as one model.

TPReplica has LocalReplica's API (`generate`, `model_config`, `memory`, `shutdown`),
so callers do not care whether a replica is one process or a group of ranks.

Lifecycle:
  start     reserve one bundle per rank packed on one node (STRICT_PACK), waiting as
            long as it takes (an autoscaler may be adding the node) with a progress
            line now and then; start the workers in it, rendezvous at rank 0's
            node, build each rank's shard.
  generate  every rank runs the same batch; the driver waits on the results while
            pinging each rank (the sentinel) and watching token progress. A rank
            that dies, stops answering, or stops making progress fails the batch:
            the replica tears itself down, rebuilds and retries the batch
            (`max_retries` times), then raises ReplicaError naming the rank (the
            one that died, not a peer that lost its connection to it).
  shutdown  kill the workers and remove the placement group (also on __del__ and
            on leaving a `with` block).

Created inside another actor (a Ray Data stage actor), the workers die with their
owner however it ends, and a graceful end (Ray Data drops its UDF, the actor exits)
runs __del__, which removes the placement group. Ray scopes placement groups to the
job, not to the creating actor: if the owner is force-killed (ray.kill, OOM) its
placement group stays reserved until the job ends.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lineray.models.checkpoint import first_line
from lineray.models.generate import Condition
from lineray.workers.config import ReplicaConfig
from lineray.workers.worker import RankInfo, TPWorker

log = logging.getLogger(__name__)


class ReplicaError(RuntimeError):
    """The replica could not start or could not finish a batch; the message says which rank and why."""


class _WorkerFailure(Exception):
    """A rank died, hung or lost its peers: the group is unusable and must be rebuilt."""


@dataclass(frozen=True)
class TPOptions:
    cpus_per_rank: float = 0.5  # fractional, so a tp=2 replica fits beside other stages on a 2-core node
    threads_per_rank: int | None = None  # torch intra-op threads per rank (None: Ray's default for the CPUs)
    ping_timeout_s: float = 30.0  # a rank that does not answer a ping this long is hung
    stall_timeout_s: float = 300.0  # no token finished on the device of every rank for this long: stuck
    placement_timeout_s: float | None = None  # give up reserving the ranks' node after this long (None: never)
    placement_report_s: float = 30.0  # while waiting for the node, log what we wait for this often
    setup_timeout_s: float = 300.0  # starting the workers, rendezvous and weight loading
    collective_timeout_s: float = 60.0  # torch.distributed's own timeout per collective, the last line of defence
    max_retries: int = 1  # rebuilds per batch before giving up
    poll_s: float = 0.2  # how often the driver checks on the ranks during a batch


class TPReplica:
    worker_class = TPWorker  # benchmarks and tests run an instrumented subclass (workers/instrumented.py)

    def __init__(self, cfg: ReplicaConfig, options: TPOptions = TPOptions()):
        cfg.model.config().check_tp(cfg.tp, cfg.model.preset)
        if not ray.is_initialized():
            raise ReplicaError("a tensor-parallel replica needs Ray: call lineray.cluster.local.ensure_ray() first")
        self.cfg, self.options = cfg, options
        self.name = f"lineray-tp{cfg.tp}-{uuid.uuid4().hex[:8]}"
        self._pg = None
        self._workers: list = []
        self._names: list[str] = []
        self._starts = 0  # names stay unique while a killed generation's actors are still being reaped
        self.ranks: list[RankInfo] = []  # what each rank holds, from its last setup
        self.rebuilds = 0  # times the group was torn down and started again after a failure
        self._closed = False
        self._start()

    # -- lifecycle ---------------------------------------------------------------
    def _start(self) -> None:
        o, tp = self.options, self.cfg.tp
        self._starts += 1
        name = f"{self.name}-{self._starts}"
        bundle = {"CPU": o.cpus_per_rank}
        if self.cfg.device.startswith("cuda"):
            bundle["GPU"] = 1
        try:
            self._pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=name)
            self._wait_for_placement(bundle)
            actor = ray.remote(self.worker_class)
            self._names = [f"{name}-rank{r}" for r in range(tp)]
            self._workers = [
                actor.options(num_cpus=o.cpus_per_rank, num_gpus=bundle.get("GPU", 0), max_concurrency=4,
                              max_restarts=0, max_task_retries=0, name=self._names[r],
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  self._pg, placement_group_bundle_index=r))
                .remote(self.cfg, r, o.threads_per_rank)
                for r in range(tp)]
            addr, port = ray.get(self._workers[0].rendezvous_address.remote(), timeout=o.setup_timeout_s)
            setups = [w.setup.remote(addr, port, o.collective_timeout_s, o.setup_timeout_s) for w in self._workers]
            self.ranks = ray.get(setups, timeout=o.setup_timeout_s)
        except BaseException as e:
            self._teardown()
            cause = getattr(e, "cause", None)
            if isinstance(e, RayTaskError) and isinstance(cause, ValueError):
                raise cause from None  # a bad checkpoint or setting: the worker's own clear message
            if isinstance(e, (ReplicaError, KeyboardInterrupt)):
                raise
            raise ReplicaError(f"{self.name}: could not start {tp} workers: {first_line(e)}") from e

    def _wait_for_placement(self, bundle: dict) -> None:
        """Block until the placement group is placed: as long as it takes, unless placement_timeout_s is set.

        On an autoscaling cluster a GPU node can take many minutes to appear; meanwhile
        a line every placement_report_s says what the replica waits for and what the
        cluster has, so a job that cannot be placed at all does not wait in silence.
        """
        o, tp = self.options, self.cfg.tp
        want = f"{tp} bundles of {_resources(bundle)} on one node"
        t0 = time.monotonic()
        while True:
            chunk = o.placement_report_s
            if o.placement_timeout_s is not None:
                chunk = min(chunk, o.placement_timeout_s - (time.monotonic() - t0))
            if self._pg.wait(timeout_seconds=max(1, round(chunk))):  # whole seconds only
                return
            waited = time.monotonic() - t0
            if o.placement_timeout_s is not None and waited >= o.placement_timeout_s:
                raise ReplicaError(f"{self.name}: could not reserve {want} within {o.placement_timeout_s:g}s "
                                   f"({_cluster_summary(bundle)})")
            log.warning("%s: waiting %.0fs so far for %s (%s); waiting on until a node with room appears",
                        self.name, waited, want, _cluster_summary(bundle))

    def _teardown(self) -> None:
        for w in self._workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._workers = []
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - already removed, or Ray is shutting down
                pass
            self._pg = None

    def shutdown(self) -> None:
        """Kill the workers and remove the placement group. Safe to call twice."""
        self._closed = True
        if self._workers or self._pg is not None:
            self._teardown()

    def __enter__(self) -> "TPReplica":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            if ray.is_initialized():
                self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def placement_group_id(self) -> str | None:
        return None if self._pg is None else self._pg.id.hex()

    @property
    def worker_names(self) -> list[str]:
        """Ray actor names of the live workers, in rank order (empty after shutdown)."""
        return list(self._names) if self._workers else []

    # -- the LocalReplica API ------------------------------------------------------
    @property
    def model_config(self):
        return self.cfg.model.config()

    def generate(self, cond: Condition, seeds: list[int], on_step=None, sampling=None, grid=None) -> torch.Tensor:
        """Tokens [B, N] (CPU) for the batch; on_step(i) is called in this process as tokens complete.
        `sampling` overrides the replica's for this batch (e.g. a per-prompt cfg scale); `grid` (rows, cols): the
        batch's image grid (Lumina-mGPT's sizes)."""
        cfg = self.model_config
        steps = None if grid is None else grid[0] * (grid[1] + cfg.line_extra)
        results = self._run(cond, seeds, on_step, "generate", steps=steps, sampling=sampling, grid=grid)
        return self._same_on_every_rank(results, "tokens")

    def sample_grids(self, cond: Condition, seeds: list[int], sampling=None) -> list:
        """Each image's grid, drawn by the model on every rank (see replica.sample_sizes_then_generate)."""
        return self._same_on_every_rank(self._run(cond, seeds, None, "sample_grids", steps=0, sampling=sampling),
                                        "image sizes")

    def _same_on_every_rank(self, results: list, what: str):
        first = results[0]
        for r, t in enumerate(results[1:], start=1):
            if not (torch.equal(t, first) if torch.is_tensor(first) else t == first):  # lockstep broken: never
                raise ReplicaError(f"{self.name}: rank {r} sampled different {what} from rank 0")
        return first

    def memory(self):
        """Rank 0's cache MemoryReport (every rank holds the same share); None before the first batch."""
        return self.rank_info()[0].kv if self._workers else None

    def rank_info(self) -> list[RankInfo]:
        """Per rank: weight bytes (total, sharded, replicated), K/V bytes of its heads, process RSS."""
        self._ensure_started()
        return ray.get([w.info.remote() for w in self._workers], timeout=self.options.ping_timeout_s)

    # -- running a batch -------------------------------------------------------------
    def _ensure_started(self) -> None:
        """Start the group again after a failed batch tore it down (never after shutdown())."""
        if self._closed:
            raise ReplicaError(f"{self.name} has been shut down")
        if not self._workers:
            self._start()

    def _run(self, cond: Condition, seeds: list[int], on_step, method: str, steps: int | None = None,
             **kwargs) -> list:
        """Call worker `method`(cond, seeds, batch_id, **kwargs) on every rank; their results in rank order.

        Watches the ranks while they work, rebuilds the group and retries after a failure.
        steps: tokens the batch runs (default: the whole image), for on_step.
        """
        progress = _Progress(on_step)
        failures = []
        while True:
            self._ensure_started()
            try:
                results = self._run_once(method, cond, list(seeds), progress, kwargs)
                progress.update(self.model_config.image_tokens if steps is None else steps)
                return results
            except _WorkerFailure as e:
                failures.append(str(e))
                self._teardown()
                if len(failures) > self.options.max_retries:
                    raise ReplicaError(f"{self.name}: batch failed {len(failures)} time(s), giving up: "
                                       + " | ".join(failures)) from None
                self.rebuilds += 1
                log.warning("%s: %s; rebuilding the replica and retrying the batch", self.name, e)

    def _run_once(self, method: str, cond: Condition, seeds: list[int], progress: "_Progress", kwargs: dict) -> list:
        o = self.options
        n_tokens = self.model_config.image_tokens
        cond_ref, batch_id = ray.put(cond), uuid.uuid4().hex
        refs = [getattr(w, method).remote(cond_ref, seeds, batch_id, **kwargs) for w in self._workers]
        pending = list(refs)
        best, best_t = 0, time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=o.poll_s)
            for ref in done:  # a finished rank that failed fails the batch now, not when all are done
                self._get(ref, refs.index(ref), method)
            if not pending:
                break
            step = self._ping(batch_id)
            progress.update(step)
            if step > best:
                best, best_t = step, time.monotonic()
            elif time.monotonic() - best_t > o.stall_timeout_s:
                raise _WorkerFailure(f"no token finished on every rank's device for {o.stall_timeout_s:g}s "
                                     f"(stuck at token {step}/{n_tokens})")
        return [self._get(ref, r, method) for r, ref in enumerate(refs)]

    def _ping(self, batch_id: str) -> int:
        """Ask every rank how far it is in this batch; a dead or silent rank raises _WorkerFailure.

        Returns the tokens done by the slowest rank (0 for a rank that has not started the batch).
        """
        o = self.options
        pings = [w.ping.remote() for w in self._workers]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=o.ping_timeout_s)
        for r, ref in enumerate(pings):
            if ref not in ready:
                raise _WorkerFailure(f"{self._rank_name(r)} did not answer a ping within {o.ping_timeout_s:g}s (hung)")
        answers = [self._get(ref, r, "ping") for r, ref in enumerate(pings)]
        return min(step if batch == batch_id else 0 for batch, step in answers)

    def _get(self, ref, rank: int, what: str):
        try:
            return ray.get(ref, timeout=self.options.ping_timeout_s)
        except RayActorError as e:
            raise _WorkerFailure(f"{self._rank_name(rank)} died during {what}: {first_line(e)}") from None
        except GetTimeoutError:
            raise _WorkerFailure(f"{self._rank_name(rank)} did not return its {what} result") from None
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ValueError):  # bad input (GenerationError ...): every rank refuses it alike
                raise cause from None
            # Anything else means the group is broken. Typically a peer died and this rank's
            # collective failed ("connection reset by peer"): name the rank that died.
            error = f"{self._rank_name(rank)} failed during {what}: {first_line(cause or e)}"
            culprits = {r: why for r, why in self._broken_ranks().items() if r != rank}
            if culprits:
                named = "; ".join(f"{self._rank_name(r)} {why} during {what}" for r, why in culprits.items())
                raise _WorkerFailure(f"{named} (then {error})") from None
            raise _WorkerFailure(error) from None

    def _broken_ranks(self) -> dict[int, str]:
        """Ranks whose actor is dead (a ping fails with RayActorError) or hung (no answer within ping_timeout_s)."""
        o = self.options
        pings = [w.ping.remote() for w in self._workers]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=o.ping_timeout_s)
        broken = {}
        for r, ref in enumerate(pings):
            if ref not in ready:
                broken[r] = f"hung (no answer to a ping within {o.ping_timeout_s:g}s)"
                continue
            try:
                ray.get(ref)
            except RayActorError:
                broken[r] = "died"
        return broken

    def _rank_name(self, rank: int) -> str:
        pid = self.ranks[rank].pid if rank < len(self.ranks) else "?"
        return f"rank {rank} (pid {pid})"

    def __repr__(self) -> str:
        return f"TPReplica({self.name}, tp={self.cfg.tp}, model={self.cfg.model.preset}, workers={len(self._workers)})"


def _resources(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _cluster_summary(keys) -> str:
    """Free resources of the cluster and the largest node (by `keys`, e.g. GPU and CPU)."""
    pick = (lambda res: {k: res.get(k, 0.0) for k in keys})
    nodes = [pick(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda r: tuple(r.get(k, 0.0) for k in ("GPU", "CPU")), default={})
    return (f"cluster: {len(nodes)} node(s), free {_resources(pick(ray.available_resources()))}, "
            f"largest node {_resources(largest)}")


class _Progress:
    """Calls on_step(i) once per finished token, in order, across retries of the same batch."""

    def __init__(self, on_step):
        self.on_step, self.reported = on_step, 0

    def update(self, done: int) -> None:
        if self.on_step is None:
            self.reported = max(self.reported, done)
            return
        while self.reported < done:
            self.on_step(self.reported)
            self.reported += 1
