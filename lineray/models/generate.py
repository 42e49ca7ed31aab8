"""The decode loop: prefill the condition, then one token per step through the KV cache.

Plain and synchronous (gpt-fast style). Rows are [cond; uncond] when CFG is on;
both halves are fed the same sampled token. Every tensor-parallel rank runs this
same loop on its shard and samples the same token, because logits are gathered
before sampling and the uniforms come from each image's own seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lineray.cache import CacheSpec, KVCache
from lineray.kernels.sampling import SamplingConfig, guided_logits, image_uniforms, sample
from lineray.models.llamagen import Transformer


class GenerationError(ValueError):
    """Bad generation input (labels, captions, seeds); the message says which."""


@dataclass
class Condition:
    """What each image is conditioned on: class labels (c2i) or caption embeddings (t2i)."""
    labels: torch.Tensor | None = None  # [B] int64
    captions: torch.Tensor | None = None  # [B, T, caption_dim]
    caption_mask: torch.Tensor | None = None  # [B, T] bool, True = real token

    @classmethod
    def classes(cls, labels) -> "Condition":
        return cls(labels=torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.captions)

    def select(self, idx) -> "Condition":
        pick = (lambda t: None if t is None else t[idx])
        return Condition(pick(self.labels), pick(self.captions), pick(self.caption_mask))


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] int64
    logits: torch.Tensor | None  # [B, N, V] fp32 guided logits, when asked for
    cache: KVCache


def check_condition(model: Transformer, cond: Condition) -> None:
    cfg = model.config
    if len(cond) == 0:
        raise GenerationError("no prompts given: the batch is empty")
    if cfg.model_type == "c2i":
        if cond.labels is None:
            raise GenerationError("this is a class-conditional (c2i) model: give class labels")
        bad = cond.labels[(cond.labels < 0) | (cond.labels >= cfg.num_classes)]
        if len(bad):
            raise GenerationError(f"class id {int(bad[0])} is out of range: this model has "
                                  f"{cfg.num_classes} classes (0..{cfg.num_classes - 1})")
    else:
        if cond.captions is None:
            raise GenerationError("this is a text-conditional (t2i) model: give caption embeddings")
        want = (cfg.cls_token_num, cfg.caption_dim)
        if tuple(cond.captions.shape[1:]) != want:
            raise GenerationError(f"caption embeddings must be [batch, {want[0]}, {want[1]}], "
                                  f"got {list(cond.captions.shape)}")


def condition_rows(model: Transformer, cond: Condition, use_cfg: bool):
    """The model input for the prefill rows, and the key mask over condition tokens (t2i) or None."""
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    if model.config.model_type == "c2i":
        x = cond.labels.to(device)
        mask = None
    else:
        x = cond.captions.to(device=device, dtype=dtype)
        mask = None if cond.caption_mask is None else cond.caption_mask.to(device=device, dtype=torch.bool)
    if use_cfg:
        x = torch.cat([x, model.null_condition(x)])
        if mask is not None:
            mask = torch.cat([mask, mask])
    return x, mask


def new_cache(model: Transformer, cache_spec: CacheSpec, rows: int, use_cfg: bool) -> KVCache:
    cfg = model.config
    plan = cache_spec.plan(cfg.grid_size, cfg.grid_size, cfg.image_tokens)
    w = model.tok_embeddings.weight
    return KVCache(plan, n_layers=cfg.n_layer, rows=rows, heads=model.local_heads, head_dim=cfg.head_dim,
                   prefix_len=cfg.prefix_len, dtype=w.dtype, device=w.device, cfg_rows=use_cfg)


@torch.inference_mode()
def generate_tokens(model: Transformer, cond: Condition, seeds: list[int] | None = None, *,
                    sampling: SamplingConfig = SamplingConfig(), cache_spec: CacheSpec = CacheSpec(),
                    teacher_tokens: torch.Tensor | None = None, return_logits: bool = False,
                    cache: KVCache | None = None, on_step=None) -> Generation:
    """Generate the image tokens of a batch.

    seeds: one per image (required unless teacher_tokens is given). teacher_tokens
    [B, N]: feed these instead of sampling (teacher forcing, for evaluation).
    cache: reuse a cache built by `new_cache` for the same rows (no allocation).
    on_step(i): called after each token, for progress.
    """
    check_condition(model, cond)
    cfg = model.config
    n_img, n_tok = len(cond), cfg.image_tokens
    device = model.tok_embeddings.weight.device
    if teacher_tokens is None:
        if seeds is None or len(seeds) != n_img:
            raise GenerationError(f"need one seed per image: {n_img} images, "
                                  f"{'no' if seeds is None else len(seeds)} seeds")
        uniforms = image_uniforms(seeds, n_tok, device)
    x, key_mask = condition_rows(model, cond, sampling.uses_cfg)
    if cache is None:
        cache = new_cache(model, cache_spec, x.size(0), sampling.uses_cfg)
    cache.reset(key_mask)
    tokens = torch.empty(n_img, n_tok, dtype=torch.long, device=device)
    all_logits = torch.empty(n_img, n_tok, cfg.vocab_size, device=device) if return_logits else None
    logits = model.prefill(x, cache)
    for i in range(n_tok):
        guided = guided_logits(logits, n_img, i, sampling)
        if all_logits is not None:
            all_logits[:, i] = guided
        tok = teacher_tokens[:, i].to(device) if teacher_tokens is not None else sample(guided, uniforms[:, i], sampling)
        tokens[:, i] = tok
        if i + 1 < n_tok:
            logits = model.decode(torch.cat([tok, tok]) if sampling.uses_cfg else tok, i, cache)
        if on_step is not None:
            on_step(i)
    return Generation(tokens, all_logits, cache)
