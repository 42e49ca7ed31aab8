"""Memory-aware batch sizing: how many images fit a device memory budget for a model and cache policy.

The K/V cache is static and preallocated, so its size is exact arithmetic (the prefix
capacity, max_prefix_len for text prompts, plus the policy's visual slots); the
weights are exact, per tensor-parallel rank (the split layers divided, the
embeddings and norms whole on every rank), counted on a model built on the meta
device, so every family's modules count without a formula per family. On top come the largest temporaries of
one batch, which do not overlap in time: the decode step's activations and the
sampling workspace always, plus the larger of the prefill (120 condition tokens for
t2i) and the eviction at a line end (one layer at a time, see KVCache._end_of_line).
A cache that is replaced is freed first (KVCache.resize), so only one is counted.
`tests/test_cache.py` checks the plan against the peak of real allocations.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from lineray.cache import CacheSpec
from lineray.models.config import GPTConfig
from lineray.models.layers import TPGroup, checkpoint_tensors


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int  # this rank's parameters and buffers
    kv_bytes_per_image: int  # K + V, all layers, both CFG rows, this rank's heads
    meta_bytes_per_image: int  # slot positions, scores, key mask
    activation_bytes_per_image: int  # one decode step: logits, attention, hidden states, sampling (estimate)
    transient_bytes_per_image: int  # the larger of the prefill and a line-end eviction (estimate)

    @property
    def bytes_per_image(self) -> int:
        return (self.kv_bytes_per_image + self.meta_bytes_per_image + self.activation_bytes_per_image
                + self.transient_bytes_per_image)

    def max_batch(self, budget_bytes: int) -> int:
        free = budget_bytes - self.weights_bytes
        return max(0, free // self.bytes_per_image)


def param_count(cfg: GPTConfig) -> int:
    return sum(_param_counts(cfg, tp=1))


@functools.lru_cache(maxsize=64)
def _param_counts(cfg: GPTConfig, tp: int) -> tuple[int, int]:
    """(replicated, split) parameters of rank 0 (split layers give it the larger part): the model's own
    shard, built on the meta device (no memory, no collectives)."""
    from lineray.models.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(cfg, TPGroup(rank=0, size=tp))
    total = sum(p.numel() for p in model.parameters())
    split = sum(t.target.numel() for t in checkpoint_tensors(model) if t.split)
    return total - split, split


def weight_bytes(cfg: GPTConfig, dtype: torch.dtype, tp: int = 1) -> int:
    """Parameters of rank 0 (the largest share) plus the fp32 RoPE table (sized for the largest grid)."""
    from lineray.models.family import largest_image_tokens
    rope = (cfg.prefix_len + largest_image_tokens(cfg)) * cfg.head_dim * 4
    # A model of several grids has the same parameters at each: counted once, at its target's grid.
    shape = replace(cfg, grid_size=cfg.target_size // 16, grid_w=None) if cfg.target_size else cfg
    return sum(_param_counts(shape, tp)) * _size(dtype) + rope


def memory_plan(cfg: GPTConfig, cache: CacheSpec, dtype: torch.dtype = torch.bfloat16, *, cfg_rows: bool = True,
                tp: int = 1) -> MemoryPlan:
    plan = cfg.cache_plan(cache)
    elem = _size(dtype)
    rows = 2 if cfg_rows else 1
    heads = cfg.n_head // tp
    P, V, D = cfg.prefix_len, cfg.vocab_size, cfg.head_dim
    slots = P + plan.visual_capacity
    per_row_head = cfg.n_layer * heads * slots
    kv = rows * per_row_head * D * 2 * elem
    key_mask = slots * 4 if cfg.model_type != "c2i" else 0  # the additive key mask of padded prefixes
    meta = rows * (per_row_head * (4 + (4 if plan.scoring else 0)) + key_mask)
    ffn = part(cfg.ffn_hidden, tp)
    head = 2 * part(cfg.head_hidden, tp) * elem  # an MLP head's hidden layer (Janus), before and after GELU
    act = (rows * (V * (3 * elem + 4)  # logits: this rank's part, the gathered ones, then fp32
                   + 3 * heads * slots * 4  # attention logits, mask, probabilities (fp32)
                   + 3 * ffn * elem + 8 * cfg.dim * elem + head + 2 * D * 4)  # + the row's RoPE table
           + 6 * V * 8  # guidance and sampling (fp32 logits, fp64 probabilities and CDF, sort)
           + cfg.image_tokens * 16)  # tokens, uniforms
    prefill = rows * P * ((cfg.caption_dim * elem if cfg.model_type == "t2i" else 0)
                          + (3 * heads * D + 3 * ffn + 6 * cfg.dim) * elem + (4 * heads + 1) * D * 4  # fp32 RoPE
                          + P * (1 + 2 * heads * 4))  # mask, attention weights
    evict = 0
    if plan.evicts:  # one layer's gathered K (then V), its indices and the selection scores
        cand = plan.visual_capacity
        grid = 3 * plan.image_tokens * 4 if plan.spec.pool > 1 else 0
        evict = rows * heads * (plan.budget * (D * elem + 3 * 8) + cand * 3 * 4 + grid)
    return MemoryPlan(weights_bytes=weight_bytes(cfg, dtype, tp), kv_bytes_per_image=kv, meta_bytes_per_image=meta,
                      activation_bytes_per_image=act, transient_bytes_per_image=max(prefill, evict))


def largest_memory_plan(cfg: GPTConfig, cache: CacheSpec, dtype: torch.dtype = torch.bfloat16, *,
                        cfg_rows: bool = True, tp: int = 1) -> MemoryPlan:
    """The plan of the grid that costs the most per image among those the model makes (one grid for most
    families; Lumina-mGPT's sizes: a job's rows may ask any, and a batch holds one): the batch size that fits
    it fits every batch."""
    from lineray.models.family import family_of
    grids = family_of(cfg.family).image_grids(cfg)
    plans = [memory_plan(replace(cfg, grid_size=rows, grid_w=cols) if (rows, cols) != (cfg.grid_h, cfg.grid_width)
                         else cfg, cache, dtype, cfg_rows=cfg_rows, tp=tp) for rows, cols in grids]
    return max(plans, key=lambda p: p.bytes_per_image)


def largest_batch(cfg: GPTConfig, cache: CacheSpec, budget_bytes: int, dtype: torch.dtype = torch.bfloat16,
                  *, cfg_rows: bool = True, tp: int = 1) -> int:
    """The largest number of images per replica whose weights + K/V + activations fit budget_bytes."""
    return memory_plan(cfg, cache, dtype, cfg_rows=cfg_rows, tp=tp).max_batch(budget_bytes)


def peak_allocated_bytes(fn) -> int:
    """Measure: the peak of CPU tensor bytes allocated while fn() runs, above what was live before.

    From the profiler's record of every allocation and free (temporaries inside ops included;
    frees of tensors allocated before fn are not seen, so create what you measure inside it).
    Slows fn down several times: for tests and benchmarks.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            sizes.append((e.start_time_ns, e.extra_fields.alloc_size))  # negative: a free
    live = peak = 0
    for _, n in sorted(sizes):
        live += n
        peak = max(peak, live)
    return peak


def part(n: int, tp: int) -> int:
    """Rank 0's share of n items split over tp ranks (TPGroup.part: the first ranks get the extra)."""
    return -(-n // tp)


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
