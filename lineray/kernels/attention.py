"""Attention over the filled part of a (possibly compacted) KV cache.

The decode step attends one query per row over `n` cached slots. Policies that
evict by attention need the softmax probabilities, so the kernel can add them into
a score buffer in the same pass instead of running attention twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | None = None,
           scores_out: torch.Tensor | None = None) -> torch.Tensor:
    """Single-query attention.

    q [R, H, 1, D]; k, v [R, H, n, D] (views of the cache, any strides);
    bias [R, 1, 1, n] additive (0 or -inf) or None;
    scores_out [R, H, n] fp32: the probabilities are added into it when given.
    Returns [R, H, 1, D] in q's dtype.
    """
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.size(-1)))
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1)
    if scores_out is not None:
        scores_out.add_(probs.squeeze(-2))
    return torch.matmul(probs.to(v.dtype), v)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal self-attention over a block of S new tokens that sit after `n - S` cached ones.

    q [R, H, S, D]; k, v [R, H, n, D]; key_mask [R, n] bool (True = may be attended).
    A masked-out query row still attends to itself so that it never produces NaN.
    """
    s, n = q.size(2), k.size(2)
    allowed = torch.ones(s, n, dtype=torch.bool, device=q.device).tril(n - s)
    if key_mask is None:
        mask = allowed
    else:
        diag = torch.zeros_like(allowed)
        diag[torch.arange(s), torch.arange(n - s, n)] = True
        mask = (allowed[None] & key_mask[:, None, :]) | diag[None]
        mask = mask[:, None]  # [R, 1, S, n]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
