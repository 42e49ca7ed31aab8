"""A tensor-parallel replica: tp Ray worker actors in one placement group, driven as one model.

TPReplica has LocalReplica's API (`generate`, `model_config`, `memory`, `shutdown`),
so callers do not care whether a replica is one process or a group of ranks.

Lifecycle:
  start     reserve one bundle per rank packed on one node (STRICT_PACK), start the
            workers in it, rendezvous at rank 0's node, build each rank's shard.
  generate  every rank runs the same batch; the driver waits on the results while
            pinging each rank (the sentinel) and watching token progress. A rank
            that dies, stops answering, or stops making progress fails the batch:
            the replica tears itself down, rebuilds and retries the batch
            (`max_retries` times), then raises ReplicaError naming the rank.
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
from lineray.workers.replica import ReplicaConfig
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
    stall_timeout_s: float = 300.0  # no new token on any rank for this long: the group is stuck
    setup_timeout_s: float = 300.0  # placement group reservation, rendezvous and weight loading
    collective_timeout_s: float = 600.0  # torch.distributed's own timeout, the last line of defence
    max_retries: int = 1  # rebuilds per batch before giving up
    poll_s: float = 0.2  # how often the driver checks on the ranks during a batch


class TPReplica:
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
        self.last_timing: list[dict] = []  # per rank: wall time and collective time of the last batch
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
            ready, _ = ray.wait([self._pg.ready()], timeout=o.setup_timeout_s)
            if not ready:
                raise ReplicaError(f"{self.name}: could not reserve {tp} bundles of {bundle} on one node within "
                                   f"{o.setup_timeout_s:g}s (available: {ray.available_resources()})")
            actor = ray.remote(TPWorker)
            self._names = [f"{name}-rank{r}" for r in range(tp)]
            self._workers = [
                actor.options(num_cpus=o.cpus_per_rank, num_gpus=bundle.get("GPU", 0), max_concurrency=4,
                              max_restarts=0, max_task_retries=0, name=self._names[r],
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  self._pg, placement_group_bundle_index=r))
                .remote(self.cfg, r, o.threads_per_rank)
                for r in range(tp)]
            addr, port = ray.get(self._workers[0].rendezvous_address.remote(), timeout=o.setup_timeout_s)
            setups = [w.setup.remote(addr, port, o.collective_timeout_s) for w in self._workers]
            self.ranks = ray.get(setups, timeout=o.setup_timeout_s)
        except BaseException as e:
            self._teardown()
            cause = getattr(e, "cause", None)
            if isinstance(e, RayTaskError) and isinstance(cause, ValueError):
                raise cause from None  # a bad checkpoint or setting: the worker's own clear message
            if isinstance(e, (ReplicaError, KeyboardInterrupt)):
                raise
            raise ReplicaError(f"{self.name}: could not start {tp} workers: {first_line(e)}") from e

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

    def generate(self, cond: Condition, seeds: list[int], on_step=None, sampling=None) -> torch.Tensor:
        """Tokens [B, N] (CPU) for the batch; on_step(i) is called in this process as tokens complete.
        `sampling` overrides the replica's for this batch (e.g. a per-prompt cfg scale)."""
        return self._run(cond, seeds, on_step, return_logits=False, sampling=sampling)[0]

    def generate_with_logits(self, cond: Condition, seeds: list[int], on_step=None):
        """(tokens [B, N], guided logits [B, N, V] fp32) — the logits as rank 0 saw them."""
        return self._run(cond, seeds, on_step, return_logits=True)

    def time_batch(self, cond: Condition, seeds: list[int], max_tokens: int | None = None,
                   on_step=None) -> list[dict]:
        """Run a batch (or only its first max_tokens tokens, on every rank) for a benchmark.

        Returns per rank: steps, wall_s, decode_s (after the first token), all_reduce_s/_calls,
        all_gather_s/_calls. Collective time includes waiting for the slowest rank.
        """
        self._run(cond, seeds, on_step, return_logits=False, max_tokens=max_tokens)
        return self.last_timing

    def all_reduce_latency(self, rows: int, n: int = 100) -> float:
        """Seconds per all-reduce of one decode step's activations for `rows` rows (pure communication)."""
        self._ensure_started()
        refs = [w.all_reduce_latency.remote(rows, n) for w in self._workers]
        return max(ray.get(refs, timeout=self.options.setup_timeout_s))

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

    def _run(self, cond: Condition, seeds: list[int], on_step, return_logits: bool, max_tokens: int | None = None,
             sampling=None):
        progress = _Progress(on_step)
        failures = []
        while True:
            self._ensure_started()
            try:
                return self._run_once(cond, list(seeds), progress, return_logits, max_tokens, sampling)
            except _WorkerFailure as e:
                failures.append(str(e))
                self._teardown()
                if len(failures) > self.options.max_retries:
                    raise ReplicaError(f"{self.name}: batch failed {len(failures)} time(s), giving up: "
                                       + " | ".join(failures)) from None
                self.rebuilds += 1
                log.warning("%s: %s; rebuilding the replica and retrying the batch", self.name, e)

    def _run_once(self, cond: Condition, seeds: list[int], progress: "_Progress", return_logits: bool,
                  max_tokens: int | None, sampling=None):
        o = self.options
        n_tokens = self.model_config.image_tokens
        cond_ref, batch_id = ray.put(cond), uuid.uuid4().hex
        refs = [w.generate.remote(cond_ref, seeds, return_logits, batch_id, max_tokens, sampling)
                for w in self._workers]
        pending = list(refs)
        best, best_t = 0, time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=o.poll_s)
            for ref in done:  # a finished rank that failed fails the batch now, not when all are done
                self._get(ref, refs.index(ref), "generate")
            if not pending:
                break
            step = self._ping(batch_id)
            progress.update(step)
            if step > best:
                best, best_t = step, time.monotonic()
            elif time.monotonic() - best_t > o.stall_timeout_s:
                raise _WorkerFailure(f"no rank made progress for {o.stall_timeout_s:g}s "
                                     f"(stuck at token {step}/{n_tokens})")
        results = [self._get(ref, r, "generate") for r, ref in enumerate(refs)]
        tokens, logits, _ = results[0]
        for r, (t, _, _) in enumerate(results[1:], start=1):
            if tokens is not None and not torch.equal(t, tokens):  # lockstep broken: should never happen
                raise ReplicaError(f"{self.name}: rank {r} sampled different tokens from rank 0")
        self.last_timing = [timing for _, _, timing in results]
        progress.update(min(t["steps"] for t in self.last_timing))
        return tokens, logits

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
            # Anything else (typically gloo: "connection closed by peer") means the group is broken.
            raise _WorkerFailure(f"{self._rank_name(rank)} failed during {what}: "
                                 f"{first_line(cause or e)}") from None

    def _rank_name(self, rank: int) -> str:
        pid = self.ranks[rank].pid if rank < len(self.ranks) else "?"
        return f"rank {rank} (pid {pid})"

    def __repr__(self) -> str:
        return f"TPReplica({self.name}, tp={self.cfg.tp}, model={self.cfg.model.preset}, workers={len(self._workers)})"


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
