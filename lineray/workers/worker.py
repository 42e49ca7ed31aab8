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
import time
from dataclasses import dataclass

import ray
import torch

from lineray.cache.kv import MemoryReport
from lineray.models.generate import Condition, generate_tokens, new_cache
from lineray.models.layers import checkpoint_tensors
from lineray.workers.parallel_state import Rendezvous, join_tp_group, leave_tp_group, time_all_reduce
from lineray.workers.replica import ReplicaConfig

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


class _StopEarly(Exception):
    """Raised from on_step to end a benchmark batch after max_tokens (on every rank at the same step)."""


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, bytes of parameters in tensor-parallel layers)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    sharded = sum(t.target.numel() * t.target.element_size() for t in checkpoint_tensors(model) if t.split)
    return total, sharded


class TPWorker:
    def __init__(self, cfg: ReplicaConfig, rank: int, threads: int | None = None):
        self.cfg, self.rank = cfg, rank
        if threads:
            torch.set_num_threads(threads)
        self.tp = None
        self.model = None
        self._cache = None
        self._batch, self._step = None, 0  # current batch id and its tokens done (read by ping)
        self._max_tokens = None
        self._t0 = self._t_first = 0.0
        self._listener = None  # rank 0: the rendezvous socket, until the group takes it

    # -- setup ---------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """(address, port) where rank 0 hosts the group's rendezvous; it holds the socket until setup.

        A replica's ranks share one node (STRICT_PACK), so the group talks over
        loopback whatever interface Ray itself uses.
        """
        self._listener = Rendezvous(LOOPBACK)
        return self._listener.host, self._listener.port

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 300.0) -> RankInfo:
        """Join the group and build this rank's shard. All ranks must call it at the same time."""
        self.tp = join_tp_group(self.rank, self.cfg.tp, master_addr, master_port, device=self.cfg.device,
                                timeout_s=timeout_s, listener=self._listener)
        self._listener = None
        self.model = self.cfg.model.build_model(tp=self.tp, device=self.cfg.device, compile=self.cfg.compile)
        return self.info()

    # -- work ------------------------------------------------------------------
    def generate(self, cond: Condition, seeds: list[int], return_logits: bool = False, batch_id=None,
                 max_tokens: int | None = None, sampling=None):
        """(tokens [B, N] on CPU, guided logits [B, N, V] from rank 0 when asked for, timing dict).

        max_tokens (benchmarks): stop every rank after that many tokens, at the same step;
        tokens and logits are then None.
        """
        sampling = sampling or self.cfg.sampling  # a batch may override it (per-prompt cfg scale)
        use_cfg = sampling.uses_cfg
        rows = len(cond) * (2 if use_cfg else 1)
        if self._cache is None or self._cache.rows != rows:
            self._cache = None  # free the old one first
            self._cache = new_cache(self.model, self.cfg.cache, rows, use_cfg)
        self._batch, self._step, self._max_tokens = batch_id, 0, max_tokens
        self.tp.stats.reset()
        self._t0 = self._t_first = time.perf_counter()
        try:
            out = generate_tokens(self.model, cond, seeds, sampling=sampling, cache=self._cache,
                                  return_logits=return_logits, on_step=self._on_step)
            tokens, logits = out.tokens.cpu(), out.logits
        except _StopEarly:
            tokens = logits = None
        t_end = time.perf_counter()
        timing = dict(self.tp.stats.snapshot(), steps=self._step, wall_s=t_end - self._t0,
                      # decode steps after the first token: the steady-state step time, without the prefill
                      decode_s=t_end - self._t_first)
        logits = logits.cpu() if logits is not None and self.rank == 0 else None
        return tokens, logits, timing

    def _on_step(self, i: int) -> None:
        self._step = i + 1
        if i == 0:
            self._t_first = time.perf_counter()
        if self._max_tokens is not None and self._step >= self._max_tokens:
            raise _StopEarly

    def all_reduce_latency(self, rows: int, n: int = 100) -> float:
        """Seconds per all-reduce of one decode step's activations [rows, 1, dim], nothing else running."""
        dtype = self.model.tok_embeddings.weight.dtype
        return time_all_reduce(self.tp, (rows, 1, self.model.config.dim), n, dtype)

    # -- sentinel and reports ----------------------------------------------------
    def ping(self) -> tuple:
        """(batch id, tokens done in it). Cheap; answers while generate() runs."""
        return self._batch, self._step

    def info(self) -> RankInfo:
        total, sharded = weight_bytes(self.model)
        return RankInfo(rank=self.rank, pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                        weight_bytes=total, sharded_weight_bytes=sharded, replicated_weight_bytes=total - sharded,
                        kv=None if self._cache is None else self._cache.memory(),
                        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
                        torch_threads=torch.get_num_threads())

    def close(self) -> None:
        self._cache = self.model = None
        leave_tp_group()
