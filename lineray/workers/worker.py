"""The Ray worker actor: one tensor-parallel rank of a replica.

A TPWorker joins its replica's torch.distributed group, builds its shard of the
model (only its slices of the checkpoint), owns its slice of the KV cache (its
heads) and runs the ordinary decode loop in lockstep with its peers: every
collective in the model is matched on every rank, and every rank samples the same
token because logits are gathered before sampling and the uniforms come from each
image's seed.

The actor is threaded (the replica creates it with max_concurrency > 1) so that
`ping()` answers while `generate()` runs: the replica uses it as a sentinel to tell
a slow rank from a dead or stuck one.
"""
from __future__ import annotations

import os
import resource
import threading
from collections import deque
from dataclasses import dataclass

import ray
import torch

from lineray.cache.kv import MemoryReport
from lineray.models.generate import Condition, Generation, generate_tokens, new_cache, reusable_cache
from lineray.models.layers import TPGroup, checkpoint_tensors
from lineray.workers.config import ReplicaConfig
from lineray.workers.devices import make_current, setup_device
from lineray.workers.parallel_state import Rendezvous, join_tp_group, leave_tp_group

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RankInfo:
    """What one rank holds, in bytes (weights after sharding, K/V of its heads)."""
    rank: int
    pid: int
    node_id: str  # Ray node the rank runs on (all ranks of a replica share one)
    weight_bytes: int  # every parameter this rank holds
    sharded_weight_bytes: int  # the parameters of the split layers (q/k/v, wo, w1/w2/w3, output)
    replicated_weight_bytes: int  # embeddings and norms, the same on every rank
    kv: MemoryReport | None = None  # this rank's cache, once a batch has run
    peak_rss_bytes: int | None = None  # peak resident memory of the worker process
    torch_threads: int | None = None
    device: str = "cpu"
    peak_device_bytes: int | None = None  # peak memory torch allocated on the GPU (None on CPU)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, bytes of parameters in tensor-parallel layers)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    sharded = sum(t.target.numel() * t.target.element_size() for t in checkpoint_tensors(model) if t.split)
    return total, sharded


class StepProgress:
    """The current batch and how many of its tokens the device has finished (what `ping` reports).

    On CUDA the host runs ahead of the GPU (kernels are queued; a CUDA graph queues a
    whole step), so the host's step counter says nothing about whether the GPU is
    still working or stuck in a collective whose peer died. Each step records an
    event on the current stream, and a step counts once its event has completed. On
    CPU a step is done when the host returns from it.
    """

    def __init__(self, device: torch.device, new_event=None):
        self._new_event = new_event or (torch.cuda.Event if device.type == "cuda" else None)
        self._lock = threading.Lock()  # ping() polls from another thread of the actor
        self._pending: deque = deque()  # (tokens done, event) not yet known to be complete
        self.batch, self._done = None, 0

    def start(self, batch_id) -> None:
        with self._lock:
            self.batch, self._done = batch_id, 0
            self._pending.clear()

    def step(self, i: int) -> None:
        """Token i has been issued."""
        if self._new_event is None:
            self._done = i + 1
            return
        event = self._new_event()
        event.record()
        with self._lock:
            self._pending.append((i + 1, event))

    def poll(self) -> tuple:
        """(batch id, tokens the device has finished in it)."""
        with self._lock:
            while self._pending and self._pending[0][1].query():
                self._done = self._pending.popleft()[0]
            return self.batch, self._done


class TPWorker:
    def __init__(self, cfg: ReplicaConfig, rank: int, threads: int | None = None):
        self.cfg, self.rank = cfg, rank
        if threads:
            torch.set_num_threads(threads)
        self.tp = None
        self.model = None
        self.device = torch.device("cpu")
        self.progress = StepProgress(self.device)
        self._cache = None
        self._listener = None  # rank 0: the rendezvous socket, until the group takes it

    # -- setup ---------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """(address, port) where rank 0 hosts the group's rendezvous; it holds the socket until setup.

        A replica's ranks share one node (STRICT_PACK), so the group talks over
        loopback whatever interface Ray itself uses.
        """
        self._listener = Rendezvous(LOOPBACK)
        return self._listener.host, self._listener.port

    def setup(self, master_addr: str, master_port: int, collective_timeout_s: float = 60.0,
              join_timeout_s: float = 300.0) -> RankInfo:
        """Join the group and build this rank's shard. All ranks must call it at the same time."""
        self.device = setup_device(self.cfg.device)
        self.progress = StepProgress(self.device)
        tp = join_tp_group(self.rank, self.cfg.tp, master_addr, master_port, device=self.device,
                           collective_timeout_s=collective_timeout_s, join_timeout_s=join_timeout_s,
                           listener=self._listener)
        self._listener = None
        self.tp = self._model_group(tp)
        self.model = self.cfg.model.build_model(tp=self.tp, device=self.device, compile=self.cfg.compile)
        return self.info()

    def _model_group(self, tp: TPGroup) -> TPGroup:
        """The group the model's layers use (benchmarks wrap it to time the collectives)."""
        return tp

    # -- work ------------------------------------------------------------------
    def generate(self, cond: Condition, seeds: list[int], batch_id=None, sampling=None, grid=None) -> torch.Tensor:
        """Tokens [B, N] on CPU. `sampling` overrides the replica's for this batch (per-prompt cfg scale);
        `grid` (rows, cols): the batch's image grid (Lumina-mGPT's sizes)."""
        return self._generate(cond, seeds, batch_id, sampling, grid=grid).tokens.cpu()

    def sample_grids(self, cond: Condition, seeds: list[int], batch_id=None, sampling=None) -> list:
        """Each image's grid drawn by the model (every rank draws the same: gathered logits, the same seeds)."""
        make_current(self.device)
        self.progress.start(batch_id)
        return self.model.sample_grids(cond, seeds, sampling or self.cfg.sampling)

    def _generate(self, cond: Condition, seeds: list[int], batch_id, sampling, *, return_logits: bool = False,
                  on_step=None, grid=None) -> Generation:
        make_current(self.device)  # the actor runs methods on a pool of threads
        sampling = sampling or self.cfg.sampling
        model = self.model if grid is None else self.model.for_grid(*grid)
        rows = len(cond) * (2 if sampling.uses_cfg else 1)
        self._cache = reusable_cache(self._cache, model, self.cfg.cache)
        if self._cache is None or self._cache.rows != rows:
            self._cache = None  # free the old one first
            self._cache = new_cache(model, self.cfg.cache, rows, sampling.uses_cfg)
        self.progress.start(batch_id)

        def step(i: int) -> None:
            self.progress.step(i)
            if on_step is not None:
                on_step(i)

        return generate_tokens(model, cond, seeds, sampling=sampling, cache=self._cache,
                               return_logits=return_logits, on_step=step)

    # -- sentinel and reports ----------------------------------------------------
    def ping(self) -> tuple:
        """(batch id, tokens the device has finished in it). Cheap; answers while generate() runs."""
        return self.progress.poll()

    def info(self) -> RankInfo:
        total, sharded = weight_bytes(self.model)
        cuda = self.device.type == "cuda"
        return RankInfo(rank=self.rank, pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                        weight_bytes=total, sharded_weight_bytes=sharded, replicated_weight_bytes=total - sharded,
                        kv=None if self._cache is None else self._cache.memory(),
                        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
                        torch_threads=torch.get_num_threads(), device=str(self.device),
                        peak_device_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None)

    def close(self) -> None:
        self._cache = self.model = None
        leave_tp_group()
