"""Instruments for benchmarks and tests of tensor-parallel replicas; production code never imports this.

InstrumentedTPReplica is a TPReplica whose ranks are InstrumentedTPWorkers: the same
workers, whose model layers talk through a TimedTPGroup (collectives add up their
wall time), plus three calls:

  generate_with_logits  tokens and the guided logits rank 0 sampled from (tp=2 vs tp=1 tests)
  time_batch            a batch, or its first max_tokens tokens, with per-rank wall time
                        and time inside collectives
  all_reduce_latency    one decode step's all-reduce timed alone (pure communication)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
import torch
import torch.distributed as dist

from lineray.models.generate import Condition
from lineray.models.layers import TPGroup
from lineray.workers.tp_replica import TPReplica
from lineray.workers.worker import TPWorker


@dataclass
class CollectiveStats:
    """Wall time spent in collectives (all-reduce, all-gather) since the last reset."""
    all_reduce_s: float = 0.0
    all_reduce_calls: int = 0
    all_gather_s: float = 0.0
    all_gather_calls: int = 0

    def reset(self) -> None:
        self.all_reduce_s = self.all_gather_s = 0.0
        self.all_reduce_calls = self.all_gather_calls = 0

    def snapshot(self) -> dict:
        return dict(all_reduce_s=self.all_reduce_s, all_reduce_calls=self.all_reduce_calls,
                    all_gather_s=self.all_gather_s, all_gather_calls=self.all_gather_calls)


@dataclass(frozen=True)
class TimedTPGroup(TPGroup):
    """A TPGroup that adds up the time its collectives take (the TP overhead per step).

    On GPU the collectives are asynchronous, so the figure is only meaningful on CPU/gloo
    (or with a synchronize, which this does not add).
    """
    stats: CollectiveStats = field(default_factory=CollectiveStats, compare=False)

    def all_reduce(self, x: torch.Tensor, *args, **kw) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        out = super().all_reduce(x, *args, **kw)
        self.stats.all_reduce_s += time.perf_counter() - t0
        self.stats.all_reduce_calls += 1
        return out

    def all_gather_last(self, x: torch.Tensor, *args, **kw) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        out = super().all_gather_last(x, *args, **kw)
        self.stats.all_gather_s += time.perf_counter() - t0
        self.stats.all_gather_calls += 1
        return out


def time_all_reduce(tp: TPGroup, shape: tuple[int, ...], device: torch.device, n: int = 100,
                    dtype=torch.float32) -> float:
    """Seconds per all-reduce of a tensor of `shape` on `device`, back to back after a barrier.

    This is the pure communication cost; the all-reduce time measured inside a decode
    step is larger by however long a rank waits for its slower peers.
    """
    if tp.size == 1:
        return 0.0
    x = torch.zeros(shape, dtype=dtype, device=device)  # NCCL only takes GPU tensors
    dist.barrier(group=tp.group)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(x, group=tp.group)
    sync()
    return (time.perf_counter() - t0) / n


class _StopEarly(Exception):
    """Raised from on_step to end a benchmark batch after max_tokens (on every rank at the same step)."""


class InstrumentedTPWorker(TPWorker):
    def _model_group(self, tp: TPGroup) -> TPGroup:
        return TimedTPGroup(rank=tp.rank, size=tp.size, group=tp.group)

    def generate_with_logits(self, cond: Condition, seeds: list[int], batch_id=None, sampling=None):
        """(tokens [B, N], guided logits [B, N, V] on rank 0, None on the others), on CPU."""
        out = self._generate(cond, seeds, batch_id, sampling, return_logits=True)
        return out.tokens.cpu(), out.logits.cpu() if self.rank == 0 else None

    def time_batch(self, cond: Condition, seeds: list[int], batch_id=None, max_tokens: int | None = None) -> dict:
        """Run the batch, or its first max_tokens tokens; steps, wall_s, decode_s (after the first token)
        and the time inside collectives (including waiting for the slowest rank)."""
        self.tp.stats.reset()
        t0 = t_first = time.perf_counter()
        steps = 0

        def on_step(i: int) -> None:
            nonlocal steps, t_first
            steps = i + 1
            if i == 0:
                t_first = time.perf_counter()
            if max_tokens is not None and steps >= max_tokens:
                raise _StopEarly

        try:
            self._generate(cond, seeds, batch_id, None, on_step=on_step)
        except _StopEarly:
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        return dict(self.tp.stats.snapshot(), steps=steps, wall_s=t_end - t0, decode_s=t_end - t_first)

    def all_reduce_latency(self, rows: int, n: int = 100) -> float:
        """Seconds per all-reduce of one decode step's activations [rows, 1, dim], nothing else running."""
        dtype = self.model.dtype
        return time_all_reduce(self.tp, (rows, 1, self.model.config.dim), self.device, n, dtype)


class InstrumentedTPReplica(TPReplica):
    worker_class = InstrumentedTPWorker

    def generate_with_logits(self, cond: Condition, seeds: list[int], on_step=None):
        """(tokens [B, N], guided logits [B, N, V] fp32): the logits as rank 0 saw them."""
        return self._run(cond, seeds, on_step, "generate_with_logits")[0]

    def time_batch(self, cond: Condition, seeds: list[int], max_tokens: int | None = None,
                   on_step=None) -> list[dict]:
        """Per rank: steps, wall_s, decode_s, all_reduce_s/_calls, all_gather_s/_calls of one batch."""
        steps = min(max_tokens or self.model_config.image_tokens, self.model_config.image_tokens)
        return self._run(cond, seeds, on_step, "time_batch", steps=steps, max_tokens=max_tokens)

    def all_reduce_latency(self, rows: int, n: int = 100) -> float:
        """Seconds per all-reduce of one decode step's activations for `rows` rows (pure communication)."""
        self._ensure_started()
        refs = [w.all_reduce_latency.remote(rows, n) for w in self._workers]
        return max(ray.get(refs, timeout=self.options.setup_timeout_s))
