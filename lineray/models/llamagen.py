"""The LlamaGen GPT (FoundationVision/LlamaGen autoregressive/models/gpt.py), for inference and training.

Parameter names equal the published checkpoint keys. Projections are the small
parallel layer classes of `layers.py`, so the same code builds a tensor-parallel
shard when given a TPGroup of size > 1. Attention during generation goes through
a KV cache object (lineray.cache.KVCache) whose policy the model does not know.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.kernels.rope import apply_rope, rope_table_2d
from lineray.models.config import GPTConfig
from lineray.models.layers import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear, TPGroup, merge_parts)


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
        self.head_dim = cfg.head_dim
        self.n_head = cfg.n_head // tp.size  # local heads
        self.n_kv_head = cfg.kv_heads // tp.size
        self.wqkv = QKVParallelLinear(cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim, tp)
        self.wo = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.dim, tp)

    def forward(self, x, rope, cache=None, layer=0, mask=None):
        """mask: without a cache, the attention mask of a whole-sequence pass; with a cache, the
        additive step bias of a static-shape decode step (KVCache.step_bias)."""
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(self.wqkv.local_sections, dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, s, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.n_kv_head != self.n_head:  # grouped-query checkpoints; a no-op for LlamaGen
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


class LabelEmbedder(nn.Module):
    """Class label -> one condition token; row `num_classes` is the null class used by CFG.

    LlamaGen adds the null row only when it trains with class_dropout_prob > 0; a checkpoint
    trained without dropout has `num_classes` rows and cannot do CFG (fit_checkpoint)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def has_null_class(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def fit_checkpoint(self, rows: int) -> None:
        """Match a checkpoint's table: num_classes + 1 rows, or num_classes (no null class)."""
        if rows == self.num_classes and self.has_null_class:
            old = self.embedding_table.weight
            self.embedding_table = nn.Embedding(rows, old.size(1), device=old.device, dtype=old.dtype)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# LlamaGen's CaptionEmbedder allocates `uncond_embedding` with 120 rows whatever the model's
# condition length (cls_token_num); a shorter condition uses its first rows.
LLAMAGEN_UNCOND_ROWS = 120


class CaptionEmbedder(nn.Module):
    """Caption features [B, T, caption_dim] -> T condition tokens; `uncond_embedding[:T]` is the CFG null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.token_num = token_num
        self.cap_proj = CaptionMLP(caption_dim, dim)
        rows = max(token_num, LLAMAGEN_UNCOND_ROWS)
        self.uncond_embedding = nn.Parameter(torch.randn(rows, caption_dim) / caption_dim ** 0.5,
                                             requires_grad=False)

    def fit_checkpoint(self, rows: int) -> None:
        """Take a checkpoint's null caption of any length that covers the condition (120 in LlamaGen)."""
        old = self.uncond_embedding
        if rows >= self.token_num and rows != old.size(0):
            self.uncond_embedding = nn.Parameter(old.new_empty(rows, old.size(1)), requires_grad=False)

    def null_caption(self) -> torch.Tensor:
        return self.uncond_embedding[:self.token_num]

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)


class Transformer(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: TPGroup = TPGroup()):
        super().__init__()
        self.config, self.tp = cfg, tp
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, tp) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = ColumnParallelLinear(cfg.dim, cfg.vocab_size, tp, gather_output=True)  # vocab-parallel head
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.register_load_state_dict_pre_hook(merge_parts)  # checkpoint-layout state dicts load too

    def _rope_table(self) -> torch.Tensor:
        cfg = self.config
        return rope_table_2d(cfg.grid_size, cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)

    def _apply(self, fn, recurse=True):
        """Move/cast the module, but keep the RoPE table in fp32 (LlamaGen rotates in fp32 at any
        dtype): `model.to(bfloat16)` would otherwise round cos/sin to 8 bits. Recomputed, not cast
        back, so it is exact; it follows the device of the other buffers."""
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32:
            self.rope = self._rope_table().to(self.rope.device)
        return self

    @property
    def local_heads(self) -> int:
        return self.config.n_head // self.tp.size

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "Transformer":
        """LlamaGen's initialisation (normal(0, 0.02), zero output head) for training from scratch."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "cls_embedding.uncond_embedding":
                with torch.no_grad():
                    p.normal_(0.0, p.size(-1) ** -0.5, generator=generator)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)
        nn.init.zeros_(self.output.weight)
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
        """Shape the condition embedding like a checkpoint's (see LabelEmbedder, CaptionEmbedder)."""
        key = "cls_embedding." + ("embedding_table.weight" if self.config.model_type == "c2i" else "uncond_embedding")
        if key in shapes:
            self.cls_embedding.fit_checkpoint(shapes[key][0])

    @property
    def supports_cfg(self) -> bool:
        return self.config.model_type == "t2i" or self.cls_embedding.has_null_class

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The CFG unconditional counterpart of a batch of conditions."""
        if self.config.model_type == "c2i":
            if not self.supports_cfg:
                raise ValueError("this c2i checkpoint has no null-class row (trained with class_dropout_prob=0), "
                                 "so classifier-free guidance cannot run: set sampling cfg_scale to 1")
            return torch.full_like(cond, self.config.num_classes)
        return self.cls_embedding.null_caption().to(cond.dtype).expand_as(cond)

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        emb = self.cls_embedding(cond)
        return emb[:, :self.config.cls_token_num]

    # -- whole-sequence pass (training, reference) ---------------------------
    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, V] predicting tokens[:, i] from the condition and tokens[:, :i].

        tokens [B, N'] with N' <= N (the last one may be left out); key_mask [B, T] for t2i padding.
        """
        P = self.config.cls_token_num
        h = torch.cat([self.embed_condition(cond), self.tok_embeddings(tokens)], dim=1)
        L = h.size(1)
        mask = None
        if key_mask is not None:
            allowed = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
            keys = torch.ones(h.size(0), L, dtype=torch.bool, device=h.device)
            keys[:, :P] = key_mask
            mask = (allowed[None] & keys[:, None]) | torch.eye(L, dtype=torch.bool, device=h.device)[None]
            mask = mask[:, None]
        rope = self.rope[:L]
        for layer in self.layers:
            h = layer(h, rope, mask=mask)
        return self.output(self.norm(h[:, P - 1:])).float()

    # -- cached generation -----------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache) -> torch.Tensor:
        """Run the condition tokens through the model into the cache; logits [rows, V] for image token 0."""
        h = self.embed_condition(cond).to(self.tok_embeddings.weight.dtype)
        return self._step(h, self.rope[:h.size(1)], cache)

    def decode(self, tokens: torch.Tensor, index: int, cache) -> torch.Tensor:
        """Feed image token `index` (one per row); logits [rows, V] for token index + 1."""
        P = self.config.cls_token_num
        h = self.tok_embeddings(tokens).unsqueeze(1)
        return self._step(h, self.rope[P + index:P + index + 1], cache)

    def decode_static(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """`decode` with static shapes: the token's grid index is the cache's device counter
        `written`, attention runs over every cache slot with a mask, slots are written by index.
        Same logits as `decode`; no Python-visible state changes, so it can be compiled or captured."""
        h = self.tok_embeddings(tokens).unsqueeze(1)
        rope = self.rope.index_select(0, cache.written.view(1) + self.config.cls_token_num)
        bias = cache.step_bias()
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i, bias)
        cache.advance_static()
        return self.output(self.norm(h[:, -1])).float()

    def _step(self, h, rope, cache) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i)
        cache.advance(h.size(1))
        return self.output(self.norm(h[:, -1])).float()
