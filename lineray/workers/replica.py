"""A model replica: something that turns a batch of conditions and seeds into image tokens.

`make_replica` returns a LocalReplica (the model in this process) for tp=1 and a
TPReplica (a placement group of Ray worker actors, one per rank) for tp>1. Both
give the same tokens for the same seeds.
"""
from __future__ import annotations

import torch

from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.workers.config import ReplicaConfig
from lineray.workers.devices import make_current, setup_device

__all__ = ["LocalReplica", "ReplicaConfig", "make_replica"]


class LocalReplica:
    """tp=1: the whole model in the calling process (a Ray Data actor, a script, the CLI)."""

    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.device = setup_device(cfg.device)
        self.model = cfg.model.build_model(device=self.device, compile=cfg.compile)
        self._cache = None  # reused by every batch (resized when the batch size changes)

    @property
    def model_config(self):
        return self.model.config

    def generate(self, cond: Condition, seeds: list[int], on_step=None,
                 sampling: SamplingConfig | None = None) -> torch.Tensor:
        """Tokens [B, N] on CPU. `sampling` overrides the replica's for this batch (e.g. a per-prompt cfg scale)."""
        make_current(self.device)  # the caller may run it on another thread than the constructor
        sampling = sampling or self.cfg.sampling
        # The cache is resized in place for another batch size (its old tensors freed first).
        out = generate_tokens(self.model, cond, seeds, sampling=sampling,
                              cache_spec=self.cfg.cache, cache=self._cache, on_step=on_step)
        self._cache = out.cache
        return out.tokens.cpu()

    def memory(self):
        return None if self._cache is None else self._cache.memory()

    def shutdown(self) -> None:
        self._cache = None


def make_replica(cfg: ReplicaConfig):
    if cfg.tp == 1:
        return LocalReplica(cfg)
    from lineray.workers.tp_replica import TPReplica  # imports Ray: only when a replica needs it
    return TPReplica(cfg)
