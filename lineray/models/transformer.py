"""The decoder-only transformer every family runs on (LlamaGen, Janus-Pro, Lumina-mGPT), for inference
and training.

One Llama-style decoder (pre-norm RMSNorm, SwiGLU, no biases in the blocks) with the few switches the
families need (GPTConfig: 2D or 1D RoPE and its pair layout, norm eps, qk-norm). What differs per
family is three small modules the family supplies (lineray.models.family): the prefix embedding
(class labels, caption features, prompt token ids), the image-token embedding and the output head.
They are registered under the family's own names, so parameter names equal the checkpoint keys.

Projections are the parallel layer classes of `layers.py`, so the same code builds a tensor-parallel
shard when given a TPGroup of size > 1. Attention during generation goes through a KV cache object
(lineray.cache.KVCache) whose policy the model does not know.

Rows of a batch may have prefixes of different lengths: they are left-padded to the longest, with a
key mask over the prefix. With 1D RoPE each row's positions count its real tokens only (row r's
prompt at 0..len_r-1, image token i at len_r + i), so a row computes what it would alone; the cache
carries each row's next position (`cache.position`). With LlamaGen's 2D RoPE the condition has no
position and every row's image token i sits at grid index i, padding or not.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.kernels.rope import apply_rope, rope_table_1d, rope_table_2d
from lineray.models.config import GPTConfig
from lineray.models.family import family_of, largest_image_tokens
from lineray.models.layers import (HeadLayerNorm, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                   TPGroup, checkpoint_tensors, merge_parts)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: TPGroup):
        super().__init__()
        self.head_dim, self.rope_style = cfg.head_dim, cfg.rope_style
        self.n_head = cfg.n_head // tp.size  # local heads
        self.n_kv_head = cfg.kv_heads // tp.size
        self.wqkv = QKVParallelLinear(cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim, tp)
        self.wo = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.dim, tp)
        if cfg.qk_norm:  # Chameleon: per-head LayerNorm on q and k, before RoPE
            self.q_norm = HeadLayerNorm(cfg.n_head, cfg.head_dim, cfg.qk_norm_eps, tp)
            self.k_norm = HeadLayerNorm(cfg.kv_heads, cfg.head_dim, cfg.qk_norm_eps, tp)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope, cache=None, layer=0, mask=None):
        """rope: [S, D/2, 2] or per row [B, S, D/2, 2]. mask: without a cache, the attention mask of a
        whole-sequence pass; with a cache, the additive step bias of a static-shape decode step
        (KVCache.step_bias)."""
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(self.wqkv.local_sections, dim=-1)
        q = q.view(b, s, self.n_head, self.head_dim)
        k = k.view(b, s, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rope, self.rope_style).transpose(1, 2)
        k = apply_rope(k, rope, self.rope_style).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.n_kv_head != self.n_head:  # grouped-query checkpoints; a no-op for LlamaGen and Janus
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        elif mask is not None:
            out = cache.attend_static(layer, q, k, v, mask)
        else:
            out = cache.attend(layer, q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: TPGroup):
        super().__init__()
        # w1 (gate) and w3 (up) in one matmul; checkpoints still hold them as w1/w3.
        self.w13 = MergedColumnParallelLinear(cfg.dim, {"w1": cfg.ffn_hidden, "w3": cfg.ffn_hidden}, tp)
        self.w2 = RowParallelLinear(cfg.ffn_hidden, cfg.dim, tp)

    def forward(self, x):
        gate, up = self.w13(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: TPGroup):
        super().__init__()
        self.attention = Attention(cfg, tp)
        self.feed_forward = FeedForward(cfg, tp)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, cache=None, layer=0, mask=None):
        h = x + self.attention(self.attention_norm(x), rope, cache, layer, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: TPGroup = TPGroup()):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.family = family = family_of(cfg.family)
        # Registered under the family's checkpoint names (LlamaGen: cls_embedding, tok_embeddings;
        # Janus: prompt_embedding, image_embedding), in this order: embeddings first, then the blocks.
        prefix = family.prefix_embedding(cfg)
        self.add_module(family.prefix_name, prefix)
        self.add_module(family.image_name, family.image_embedding(cfg, prefix))
        self.layers = nn.ModuleList(TransformerBlock(cfg, tp) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = family.output_head(cfg, tp)
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.register_buffer("forced_tokens", family.forced_tokens(cfg), persistent=False)  # or None
        self.register_load_state_dict_pre_hook(merge_parts)  # checkpoint-layout state dicts load too

    def _rope_table(self) -> torch.Tensor:
        cfg = self.config
        if cfg.rope == "1d":  # long enough for the largest grid the model makes (for_grid shares it)
            return rope_table_1d(cfg.prefix_len + largest_image_tokens(cfg), cfg.head_dim, cfg.rope_base)
        return rope_table_2d(cfg.grid_size, cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.prefix_len)

    def _apply(self, fn, recurse=True):
        """Move/cast the module, but keep the RoPE table in fp32 (LlamaGen rotates in fp32 at any
        dtype): `model.to(bfloat16)` would otherwise round cos/sin to 8 bits. Recomputed, not cast
        back, so it is exact; it follows the device of the other buffers."""
        super()._apply(fn, recurse)
        self.__dict__.pop("_grid_views", None)  # views hold the old buffers: made again on demand
        if self.rope.dtype != torch.float32:
            self.rope = self._rope_table().to(self.rope.device)
        return self

    def for_grid(self, rows: int, cols: int) -> "Transformer":
        """This model making images of another grid its family allows (Lumina-mGPT's sizes): a view that
        shares every parameter and the RoPE table, with the config's grid replaced and the forced tokens
        recomputed. The decode loop, the cache plan and the forced tokens all read the view's config, so
        one loaded model serves batches of any allowed grid, one grid per generate call."""
        cfg = self.config
        if (rows, cols) == (cfg.grid_h, cfg.grid_width):
            return self
        # One view per grid, kept: a captured CUDA graph of the decode step is keyed by the model object.
        views = self.__dict__.setdefault("_grid_views", {})
        if (rows, cols) not in views:
            problem = self.family.grid_problem(cfg, rows, cols)
            if problem is not None:
                raise ValueError(problem)
            view = copy.copy(self)  # shallow: the same submodules and parameters
            view._buffers = dict(self._buffers)  # its own buffer table, so its forced tokens do not replace ours
            view.config = replace(cfg, grid_size=rows, grid_w=cols)
            forced = self.family.forced_tokens(view.config)
            view.forced_tokens = None if forced is None else forced.to(self.device)
            views[rows, cols] = view
        return views[rows, cols]

    def sample_grids(self, cond, seeds: list[int], sampling) -> list[tuple[int, int]]:
        """Each image's grid drawn by the model from its own seed (a family with size tokens: Lumina-mGPT);
        cond: prompts ending where the size tokens would follow."""
        if self.family.sample_grids is None:
            raise ValueError(f"{self.family.name} models have no size tokens: their image size cannot be sampled")
        return [tuple(g) for g in self.family.sample_grids(self, cond, seeds, sampling)]

    @property
    def prefix_embedder(self) -> nn.Module:
        return getattr(self, self.family.prefix_name)

    @property
    def image_embedder(self) -> nn.Module:
        return getattr(self, self.family.image_name)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def local_heads(self) -> int:
        return self.config.n_head // self.tp.size

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "Transformer":
        """LlamaGen's initialisation (normal(0, std), norms one, the head's last projection zero) for
        training from scratch. Parameters every rank holds whole are drawn first, so they are the same for any tp."""
        split = {t.target.untyped_storage().data_ptr() for t in checkpoint_tensors(self) if t.split}
        for name, p in sorted(self.named_parameters(), key=lambda item: item[1].untyped_storage().data_ptr() in split):
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name == "cls_embedding.uncond_embedding":
                    p.normal_(0.0, p.size(-1) ** -0.5, generator=generator)
                else:
                    p.normal_(0.0, std, generator=generator)
        last = [p for name, p in self.output.named_parameters() if name.endswith("weight")][-1]
        nn.init.zeros_(last)  # the head's last projection: LlamaGen's output.weight, Janus's output.fc2
        return self

    def compile_dense(self) -> "Transformer":
        """torch.compile the dense per-token work of every block (norms, gate/up/down).

        Attention and the KV cache stay eager here (the dynamic step's shapes change every
        step); to compile the whole static-shape step instead, use
        generate_tokens(step_mode="compiled"). dynamic=True: one graph serves every batch size.
        Off by default (ReplicaConfig.compile): the first batch pays the compile time.
        """
        for layer in self.layers:
            for part in (layer.attention_norm, layer.ffn_norm, layer.feed_forward):
                part.compile(dynamic=True)
        self.norm.compile(dynamic=True)
        return self

    # -- condition ----------------------------------------------------------
    def fit_checkpoint(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Shape the prefix embedding like a checkpoint's, where only the file tells (LlamaGen's null rows)."""
        fit = getattr(self.prefix_embedder, "fit_checkpoint", None)
        key = self.family.prefix_name + "." + getattr(self.prefix_embedder, "checkpoint_sized", "")
        if fit is not None and key in shapes:
            fit(shapes[key][0])

    @property
    def supports_cfg(self) -> bool:
        return getattr(self.prefix_embedder, "has_null_class", True)

    def null_rows(self, cond: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CFG unconditional rows of a batch of prefixes (and their key mask), by the family's rule."""
        return self.family.null_condition(self, cond, mask)

    def null_condition(self, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The CFG unconditional counterpart of a batch of conditions (its key mask: `null_rows`)."""
        return self.null_rows(cond, mask)[0]

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        emb = self.prefix_embedder(cond)
        return emb if self.config.model_type == "text" else emb[:, :self.config.cls_token_num]

    def start_positions(self, key_mask: torch.Tensor | None, rows: int) -> torch.Tensor:
        """RoPE position of each row's first prefix slot: minus its left padding with 1D RoPE (its
        first real token at 0), 0 with 2D RoPE (positions are grid indices; padding moves nothing)."""
        if key_mask is not None and self.config.rope == "1d":
            return -(~key_mask).sum(1)
        return torch.zeros(rows, dtype=torch.long, device=self.device)

    def _prefix_rope(self, start: torch.Tensor, length: int) -> torch.Tensor:
        """Per-row tables [B, length, D/2, 2] for the prefix slots (padding slots clamp to position 0)."""
        positions = start[:, None] + torch.arange(length, device=start.device)
        return self.rope[positions.clamp_min(0)]

    def force_tokens(self, tokens: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        """The family's fixed tokens (e.g. an end-of-line) replace the sampled ones at image position
        `step` (an int, or a 0-dim device tensor inside the static step); a no-op for most families."""
        if self.forced_tokens is None:
            return tokens
        forced = self.forced_tokens.index_select(0, torch.as_tensor(step, device=tokens.device).view(1))
        return torch.where(forced >= 0, forced, tokens)

    # -- whole-sequence pass (training, reference) ---------------------------
    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, V] predicting tokens[:, i] from the condition and tokens[:, :i].

        tokens [B, N'] with N' <= N (the last one may be left out); key_mask [B, T] over the prefix
        (padding False; left padding for text prompts).
        """
        prefix = self.embed_condition(cond)
        P = prefix.size(1)
        h = torch.cat([prefix, self.image_embedder(tokens).to(prefix.dtype)], dim=1)
        L = h.size(1)
        mask = None
        if key_mask is not None:
            allowed = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
            keys = torch.ones(h.size(0), L, dtype=torch.bool, device=h.device)
            keys[:, :P] = key_mask
            mask = (allowed[None] & keys[:, None]) | torch.eye(L, dtype=torch.bool, device=h.device)[None]
            mask = mask[:, None]
        rope = self._prefix_rope(self.start_positions(key_mask, h.size(0)), L)
        for layer in self.layers:
            h = layer(h, rope, mask=mask)
        return self.output(self.norm(h[:, P - 1:])).float()

    # -- cached generation -----------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache, head=None) -> torch.Tensor:
        """Run the condition tokens through the model into the cache (reset with their key mask);
        logits [rows, V] for image token 0. head: another output head on the last hidden state (Lumina's
        size tokens); default the model's."""
        h = self.embed_condition(cond).to(self.dtype)
        start = self.start_positions(cache.key_mask, h.size(0))
        cache.position.copy_(start)
        return self._step(h, self._prefix_rope(start, h.size(1)), cache, head)

    def decode(self, tokens: torch.Tensor, cache, head=None) -> torch.Tensor:
        """Feed the next image token (one per row) at each row's position; logits [rows, V] for the one after."""
        h = self.image_embedder(tokens).unsqueeze(1)
        return self._step(h, self.rope[cache.position].unsqueeze(1), cache, head)

    def decode_static(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """`decode` with static shapes: positions are the cache's device counters, attention runs over
        every cache slot with a mask, slots are written by index. Same logits as `decode`; no
        Python-visible state changes, so it can be compiled or captured."""
        h = self.image_embedder(tokens).unsqueeze(1)
        rope = self.rope.index_select(0, cache.position).unsqueeze(1)
        bias = cache.step_bias()
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i, bias)
        cache.advance_static()
        return self.output(self.norm(h[:, -1])).float()

    def _step(self, h, rope, cache, head=None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i)
        cache.advance(h.size(1))
        return (head or self.output)(self.norm(h[:, -1])).float()
