"""Janus-Pro's generation-side modules on the shared Transformer (MODELS.md A1-A3).

The LM is a plain Llama (1D rotate-half RoPE, RMSNorm eps 1e-6, MHA, SwiGLU): the shared blocks
with switches. What is Janus's own:
  prompt_embedding   the LM's text table (embed_tokens), for the prompt tokens
  image_embedding    gen_embed (16384 x 8, a table of its own, not the VQ codebook) -> gen_aligner
                     (Linear(8, H), GELU, Linear(H, H), with biases)
  output             gen_head: Linear(H, head_hidden), GELU (exact), Linear(head_hidden, 16384), with
                     biases; column- then row-parallel, so ranks exchange one all-reduce and no gather
and the CFG null prompt: the same row with every token between BOS and the last one
(`<begin_of_image>`) replaced by the CFG pad token (generation_inference.py L69-73).
Parameter names: FAMILIES.md section 2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineray.models.config import GPTConfig
from lineray.models.layers import ColumnParallelLinear, RowParallelLinear, TPGroup


class ImageTokenEmbedding(nn.Module):
    """gen_embed + gen_aligner: image code -> a small learned vector -> the model width."""

    def __init__(self, vocab_size: int, embed_dim: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, embed_dim)
        self.fc1 = nn.Linear(embed_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.table(tokens))))


class ImageHead(nn.Module):
    """gen_head: hidden state -> image-code logits through a GELU MLP (fc1 column-, fc2 row-parallel)."""

    def __init__(self, dim: int, hidden: int, vocab_size: int, tp: TPGroup = TPGroup()):
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden, tp, bias=True)
        self.fc2 = RowParallelLinear(hidden, vocab_size, tp, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def prompt_embedding(cfg: GPTConfig) -> nn.Module:
    return nn.Embedding(cfg.text_vocab_size, cfg.dim)


def image_embedding(cfg: GPTConfig, prefix: nn.Module) -> nn.Module:
    return ImageTokenEmbedding(cfg.vocab_size, cfg.image_embed_dim, cfg.dim)


def output_head(cfg: GPTConfig, tp: TPGroup) -> nn.Module:
    return ImageHead(cfg.dim, cfg.head_hidden, cfg.vocab_size, tp)


def null_prompt(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None):
    """Janus's unconditional rows: each left-padded prompt with its tokens strictly between the first
    real one (BOS) and the last one (`<begin_of_image>`) set to the CFG pad id; same length, same mask."""
    pad_id = model.config.cfg_pad_token_id
    if pad_id is None:
        raise ValueError("classifier-free guidance needs the CFG pad token id (config cfg_pad_token_id, read "
                         "from the checkpoint folder's tokenizer.json); set sampling cfg_scale to 1 to run without")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    first = real.int().argmax(dim=1, keepdim=True)  # left padding: the first real slot holds BOS
    slots = torch.arange(ids.size(1), device=ids.device)
    inner = real & (slots > first) & (slots < ids.size(1) - 1)
    return ids.masked_fill(inner, pad_id), mask
