"""Triton kernel for single-query (decode) attention over a KV cache view.

Same contract as `lineray.kernels.attention.attend`. One program per (row, head):
pass 1 streams the keys once for the running max and sum (online softmax); pass 2
streams keys and values again to build the normalised probabilities, accumulate the
output and, when asked, add the probabilities into the eviction score buffer.
Two passes over K cost one extra read of the keys but give exact probabilities for
the scores without storing n logits per program.

Importing this module needs triton; `attention.py` imports it lazily and only for
CUDA tensors (or tests running the interpreter, TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, scores_ptr, out_ptr,
    n, head_dim, scale,
    sq_r, sq_h, sq_d,
    sk_r, sk_h, sk_n, sk_d,
    sv_r, sv_h, sv_n, sv_d,
    sb_r, sb_n,
    ss_r, ss_h, ss_n,
    so_r, so_h, so_d,
    HAS_BIAS: tl.constexpr, HAS_SCORES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + r * sq_r + h * sq_h + offs_d * sq_d, mask=mask_d, other=0.0).to(tl.float32)
    k_base = k_ptr + r * sk_r + h * sk_h
    v_base = v_ptr + r * sv_r + h * sv_h

    # Pass 1: running max m and sum s of exp(logit - m). m starts finite, not -inf, so a
    # block whose keys are all masked gives exp(-inf - m) = 0 instead of exp(-inf + inf) = nan.
    m = tl.full((), -1.0e30, tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        logits = _logits(q, k_base, offs_n, offs_d, mask_d, n, scale, sk_n, sk_d,
                         bias_ptr + r * sb_r, sb_n, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new), axis=0)
        m = m_new

    # Pass 2: normalised probabilities -> output (fp32 accumulator) and scores.
    inv_s = 1.0 / s
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        logits = _logits(q, k_base, offs_n, offs_d, mask_d, n, scale, sk_n, sk_d,
                         bias_ptr + r * sb_r, sb_n, HAS_BIAS)
        p = tl.exp(logits - m) * inv_s
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(p[:, None] * v, axis=0)
        if HAS_SCORES:  # each (row, head) is owned by one program: a plain read-add-write is race-free
            s_ptrs = scores_ptr + r * ss_r + h * ss_h + offs_n * ss_n
            tl.store(s_ptrs, tl.load(s_ptrs, mask=mask_n, other=0.0) + p, mask=mask_n)

    out_ptrs = out_ptr + r * so_r + h * so_h + offs_d * so_d
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _logits(q, k_base, offs_n, offs_d, mask_d, n, scale, sk_n, sk_d, bias_row, sb_n,
            HAS_BIAS: tl.constexpr):
    """fp32 logits of one block of keys; keys past n get -inf (probability 0)."""
    mask_n = offs_n < n
    k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    # One query row: a broadcast multiply + reduction (tl.dot needs >= 16 rows).
    logits = tl.sum(k * q[None, :], axis=1) * scale
    if HAS_BIAS:
        logits += tl.load(bias_row + offs_n * sb_n, mask=mask_n, other=0.0).to(tl.float32)
    return tl.where(mask_n, logits, float("-inf"))


def attend_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  scores_out: torch.Tensor | None = None,
                  block_n: int = 32) -> torch.Tensor:
    """Decode attention with the Triton kernel; same contract as `attention.attend`.

    q [R, H, 1, D]; k, v [R, H, n, D] (any strides); bias [R, 1, 1, n] additive or None;
    scores_out [R, H, n] fp32, probabilities added into it when given. Returns [R, H, 1, D]
    in q's dtype. block_n: keys per loop step, a power of two. 32 with D=64 compiles to 94
    registers per thread on sm_80 (64: 156, lower occupancy) for this memory-bound loop;
    tests pass a small one to force several blocks.
    """
    R, H, one, D = q.shape
    n = k.size(2)
    assert one == 1, "decode attention takes one query per row"
    assert k.shape == v.shape == (R, H, n, D), (tuple(k.shape), tuple(v.shape))
    out = torch.empty(R, H, 1, D, dtype=q.dtype, device=q.device)
    # Absent optional tensors: the constexpr flags drop their code, any pointer will do.
    b = bias if bias is not None else q
    sb = (bias.stride(0), bias.stride(3)) if bias is not None else (0, 0)
    sc = scores_out if scores_out is not None else q
    ss = scores_out.stride() if scores_out is not None else (0, 0, 0)
    if bias is not None:
        assert bias.shape == (R, 1, 1, n), tuple(bias.shape)
    if scores_out is not None:
        assert scores_out.shape == (R, H, n) and scores_out.dtype == torch.float32
    _decode_attention_kernel[(R, H)](
        q, k, v, b, sc, out,
        n, D, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(),
        *v.stride(),
        *sb,
        *ss,
        out.stride(0), out.stride(1), out.stride(3),
        HAS_BIAS=bias is not None, HAS_SCORES=scores_out is not None,
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D),
        enable_fp_fusion=True,  # explicit: Triton 3.9 warns when unset and 3.10 flips the default
    )
    return out
