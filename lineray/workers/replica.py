"""A model replica: something that turns a batch of conditions and seeds into image tokens.

`make_replica` returns a LocalReplica (the model in this process) for tp=1 and a
TPReplica (a placement group of Ray worker actors, one per rank) for tp>1. Both
give the same tokens for the same seeds.
"""
from __future__ import annotations

import torch

from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens, reusable_cache
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
                 sampling: SamplingConfig | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens [B, N] on CPU. `sampling` overrides the replica's for this batch (e.g. a per-prompt cfg scale);
        `grid` (rows, cols): the batch's image grid when the model makes several (Lumina-mGPT's sizes)."""
        make_current(self.device)  # the caller may run it on another thread than the constructor
        sampling = sampling or self.cfg.sampling
        model = self.model if grid is None else self.model.for_grid(*grid)
        self._cache = reusable_cache(self._cache, model, self.cfg.cache)
        # The cache is resized in place for another batch size (its old tensors freed first).
        out = generate_tokens(model, cond, seeds, sampling=sampling,
                              cache_spec=self.cfg.cache, cache=self._cache, on_step=on_step)
        self._cache = out.cache
        return out.tokens.cpu()

    def sample_grids(self, cond: Condition, seeds: list[int], sampling: SamplingConfig | None = None) -> list:
        """Each image's grid, drawn by the model (a family with size tokens; see sample_sizes_then_generate)."""
        make_current(self.device)
        return self.model.sample_grids(cond, seeds, sampling or self.cfg.sampling)

    def memory(self):
        return None if self._cache is None else self._cache.memory()

    def shutdown(self) -> None:
        self._cache = None


def sample_sizes_then_generate(replica, prompts: list[list[int]], seeds: list[int], sampling=None,
                               on_step=None) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Images whose size the model draws (Lumina-mGPT `size: sample`): `prompts` end with begin-of-image. The
    replica draws each image's grid from its own seed (one prefill of the conditional rows), then generates
    the images of each grid together with the size tokens forced, so the prefix ends exactly as the model
    wrote it. (The conditional prefill runs again there: cheap next to the image, and it keeps the decode
    loop one-grid and family-blind.) on_step(n): n more tokens are done (one per image of the running size).
    Returns each image's tokens [N_i] and its (rows, cols)."""
    from lineray.models.family import family_of
    cfg = replica.model_config
    grids = replica.sample_grids(Condition.prompts(prompts), seeds, sampling)
    tokens: list = [None] * len(prompts)
    for grid in sorted(set(grids)):
        idx = [i for i, g in enumerate(grids) if g == grid]
        ids = [list(prompts[i]) + family_of(cfg.family).grid_prefix(cfg, *grid) for i in idx]
        step = None if on_step is None else (lambda i, n=len(idx): on_step(n))
        out = replica.generate(Condition.prompts(ids), [seeds[i] for i in idx], on_step=step, sampling=sampling,
                               grid=grid)
        for j, i in enumerate(idx):
            tokens[i] = out[j]
    return tokens, grids


def make_replica(cfg: ReplicaConfig):
    if cfg.tp == 1:
        return LocalReplica(cfg)
    from lineray.workers.tp_replica import TPReplica  # imports Ray: only when a replica needs it
    return TPReplica(cfg)
