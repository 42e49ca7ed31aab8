"""Attention over the filled part of a (possibly compacted) KV cache.

The decode step attends one query per row over `n` cached slots. Policies that
evict by attention need the softmax probabilities, so the kernel can add them into
a score buffer in the same pass instead of running attention twice.

Backends for the decode step: the torch reference (always on CPU), a Triton kernel
(`triton_attention.py`, CUDA) and PyTorch SDPA (CUDA without triton, no scores).
LINERAY_ATTENTION=auto|torch|triton|sdpa forces one on CUDA.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton", "sdpa")
# Read once: attend runs per layer per decode step. Ray workers inherit it from the
# driver only on a local cluster; pass it in runtime_env env_vars otherwise.
BACKEND = os.environ.get("LINERAY_ATTENTION", "auto").strip().lower() or "auto"
if BACKEND not in BACKENDS:
    raise ValueError(f"LINERAY_ATTENTION={BACKEND!r}: expected one of {BACKENDS}")


@functools.cache
def _triton_attend():
    """The Triton wrapper, or None when triton is not installed (imported lazily: CPU runs never need it)."""
    try:
        from lineray.kernels.triton_attention import attend_triton
    except ImportError:
        return None
    return attend_triton


def attention_backend(device: torch.device | str, needs_scores: bool) -> str:
    """Which implementation `attend` uses for tensors on `device`: "torch", "triton" or "sdpa".

    CPU always gets the torch path (it is the reference, and the cache tests compare
    policies bit for bit through it). On CUDA, auto prefers Triton, then SDPA; SDPA
    cannot return probabilities, so a scoring cache falls back to torch even when
    LINERAY_ATTENTION=sdpa is forced.
    """
    if torch.device(device).type != "cuda":
        return "torch"
    if BACKEND == "auto":
        if _triton_attend() is not None:
            return "triton"
        return "torch" if needs_scores else "sdpa"
    if BACKEND == "triton" and _triton_attend() is None:
        raise RuntimeError("LINERAY_ATTENTION=triton but triton is not importable")
    if BACKEND == "sdpa" and needs_scores:
        return "torch"
    return BACKEND


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | None = None,
           scores_out: torch.Tensor | None = None,
           n_visible: torch.Tensor | None = None) -> torch.Tensor:
    """Single-query attention.

    q [R, H, 1, D]; k, v [R, H, n, D] (views of the cache, any strides);
    bias [R or 1, 1, 1, n] additive (0 or -inf) or None;
    scores_out [R, H, n] fp32: the probabilities are added into it when given.
    n_visible: optional 0-dim device count; keys from there on are hidden by the bias anyway,
    and the Triton kernel skips reading them (the static step's empty slots).
    Returns [R, H, 1, D] in q's dtype.
    """
    if q.is_cuda:  # cheap test first: the CPU path stays exactly the reference below
        backend = attention_backend(q.device, scores_out is not None)
        if backend == "triton":
            return _triton_attend()(q, k, v, bias, scores_out, n_visible=n_visible)
        if backend == "sdpa":
            return attend_sdpa(q, k, v, bias)
    return attend_torch(q, k, v, bias, scores_out)


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None = None,
                 scores_out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference path (same contract as `attend`): fp32 logits and softmax."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.size(-1)))
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1)
    if scores_out is not None:
        scores_out.add_(probs.squeeze(-2))
    return torch.matmul(probs.to(v.dtype), v)


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fused PyTorch attention, for CUDA without triton; it cannot return the probabilities."""
    # The fused kernels want the mask in q's dtype; 0 and -inf are exact in fp16/bf16.
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
