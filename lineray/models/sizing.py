"""Memory-aware batch sizing: how many images fit a device memory budget for a model and cache policy.

The K/V cache is static and preallocated, so its size is exact arithmetic; the
weights are exact; the per-step activations are a small, conservative estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lineray.cache import CacheSpec
from lineray.models.config import GPTConfig


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int  # this rank's parameters
    kv_bytes_per_image: int  # K + V, all layers, both CFG rows, this rank's heads
    meta_bytes_per_image: int  # slot positions and scores
    activation_bytes_per_image: int  # logits, attention probabilities, hidden states of one step (estimate)

    @property
    def bytes_per_image(self) -> int:
        return self.kv_bytes_per_image + self.meta_bytes_per_image + self.activation_bytes_per_image

    def max_batch(self, budget_bytes: int) -> int:
        free = budget_bytes - self.weights_bytes
        return max(0, free // self.bytes_per_image)


def param_count(cfg: GPTConfig) -> int:
    cond = (cfg.num_classes + 1) * cfg.dim if cfg.model_type == "c2i" else \
        cfg.caption_dim * cfg.dim + cfg.dim * cfg.dim + cfg.cls_token_num * cfg.caption_dim
    qkv = cfg.dim * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    layer = qkv + cfg.n_head * cfg.head_dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim
    return cond + 2 * cfg.vocab_size * cfg.dim + cfg.n_layer * layer + cfg.dim


def memory_plan(cfg: GPTConfig, cache: CacheSpec, dtype: torch.dtype = torch.bfloat16, *, cfg_rows: bool = True,
                tp: int = 1) -> MemoryPlan:
    plan = cache.plan(cfg.grid_size, cfg.grid_size, cfg.image_tokens)
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = 2 if cfg_rows else 1
    heads = cfg.n_head // tp
    slots = cfg.prefix_len + plan.visual_capacity
    per_row_head = cfg.n_layer * heads * slots
    kv = rows * per_row_head * cfg.head_dim * 2 * elem
    meta = rows * per_row_head * (4 + (4 if plan.scoring else 0))
    act = rows * (3 * cfg.vocab_size * 4  # logits, guided logits, sampling workspace (fp32)
                  + 2 * heads * slots * 4  # attention logits and probabilities (fp32)
                  + 4 * cfg.ffn_hidden * elem + 8 * cfg.dim * elem) + cfg.image_tokens * 16  # tokens, uniforms
    return MemoryPlan(weights_bytes=param_count(cfg) * elem // tp, kv_bytes_per_image=kv,
                      meta_bytes_per_image=meta, activation_bytes_per_image=act)


def largest_batch(cfg: GPTConfig, cache: CacheSpec, budget_bytes: int, dtype: torch.dtype = torch.bfloat16,
                  *, cfg_rows: bool = True, tp: int = 1) -> int:
    """The largest number of images per replica whose weights + K/V + activations fit budget_bytes."""
    return memory_plan(cfg, cache, dtype, cfg_rows=cfg_rows, tp=tp).max_batch(budget_bytes)
