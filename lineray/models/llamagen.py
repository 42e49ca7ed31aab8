"""The LlamaGen family (FoundationVision/LlamaGen autoregressive/models/gpt.py): its condition
embeddings, image-token table, output head and CFG null rule, on the shared
`lineray.models.transformer.Transformer` (which LlamaGen's GPT was before the family interface).

Parameter names equal the published checkpoint keys: `cls_embedding.*` (class labels or caption
features), `tok_embeddings.weight`, `output.weight` (vocab-parallel).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.models.config import GPTConfig
from lineray.models.layers import ColumnParallelLinear, TPGroup


class LabelEmbedder(nn.Module):
    """Class label -> one condition token; row `num_classes` is the null class used by CFG.

    LlamaGen adds the null row only when it trains with class_dropout_prob > 0; a checkpoint
    trained without dropout has `num_classes` rows and cannot do CFG (fit_checkpoint)."""

    checkpoint_sized = "embedding_table.weight"  # its rows come from the checkpoint (fit_checkpoint)

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

    checkpoint_sized = "uncond_embedding"

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




# -- the family's parts (lineray.models.family) ----------------------------------------------------
def condition_embedding(cfg: GPTConfig) -> nn.Module:
    if cfg.model_type == "c2i":
        return LabelEmbedder(cfg.num_classes, cfg.dim)
    return CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)


def token_embedding(cfg: GPTConfig, prefix: nn.Module) -> nn.Module:
    return nn.Embedding(cfg.vocab_size, cfg.dim)


def output_head(cfg: GPTConfig, tp: TPGroup) -> nn.Module:
    return ColumnParallelLinear(cfg.dim, cfg.vocab_size, tp, gather_output=True)  # vocab-parallel


def null_condition(model: nn.Module, cond: torch.Tensor, mask: torch.Tensor | None):
    """The null class (c2i) or the learned null caption (t2i); the key mask stays the row's."""
    if model.config.model_type == "c2i":
        if not model.supports_cfg:
            raise ValueError("this c2i checkpoint has no null-class row (trained with class_dropout_prob=0), "
                             "so classifier-free guidance cannot run: set sampling cfg_scale to 1")
        return torch.full_like(cond, model.config.num_classes), mask
    return model.cls_embedding.null_caption().to(cond.dtype).expand_as(cond), mask
