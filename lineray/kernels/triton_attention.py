"""Triton kernels for single-query (decode) attention over a KV cache view.

Same contract as `lineray.kernels.attention.attend`. Flash-decoding layout: the grid is
(row, head, split); each program streams one chunk of the keys once, with an online
softmax (running max m, sum l and fp32 output accumulator), and writes its partial
(m, l, acc). Splitting the sequence keeps the GPU busy when rows x heads is small (a
small batch, or tensor parallelism leaving few heads per rank); with many rows x heads
there is one split. The partials are merged with a few small torch ops.

Without a score buffer that is the only pass over K. With one (LineAR and H2O accumulate
the attention probabilities) a second kernel re-reads K once per chunk to add the exact
normalised probabilities, which need the merged max and sum; it does not read V.

The static-shape step attends over the whole cache capacity with a mask; it also passes
its fill count as a device tensor (`n_visible`), and the kernels stop reading keys there, so
the fixed shape costs no memory traffic for the empty slots (and the launch grid stays fixed,
which a CUDA graph needs).

Offsets are computed in int64: a whole-image cache of a large batch holds more than 2^31
elements. Importing this module needs triton; `attention.py` imports it lazily and only for
CUDA tensors (or tests running the interpreter, TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _logits(q, k_base, offs_n, offs_d, mask_d, end, scale, sk_n, sk_d, bias_row, sb_n,
            HAS_BIAS: tl.constexpr):
    """fp32 logits of one block of keys; keys at or past `end` get -inf (probability 0)."""
    mask_n = offs_n < end
    k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    # One query row: a broadcast multiply + reduction (tl.dot needs >= 16 rows).
    logits = tl.sum(k * q[None, :], axis=1) * scale
    if HAS_BIAS:
        logits += tl.load(bias_row + offs_n * sb_n, mask=mask_n, other=0.0).to(tl.float32)
    return tl.where(mask_n, logits, float("-inf"))


@triton.jit
def _visible(n, limit_ptr, HAS_LIMIT: tl.constexpr):
    """Keys that can be visible: n, or fewer when a device count is given (the static step
    attends over the whole capacity; the empty slots past its fill count are never read)."""
    if HAS_LIMIT:
        return tl.minimum(n, tl.load(limit_ptr).to(tl.int32))
    return n


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, limit_ptr, m_ptr, l_ptr, acc_ptr,
    n, head_dim, scale, chunk,
    sq_r, sq_h, sq_d,
    sk_r, sk_h, sk_n, sk_d,
    sv_r, sv_h, sv_n, sv_d,
    sb_r, sb_n,
    HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass over the keys [split * chunk, (split + 1) * chunk): partial m, l and acc."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_heads, n_splits = tl.num_programs(1), tl.num_programs(2)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + r * sq_r + h * sq_h + offs_d * sq_d, mask=mask_d, other=0.0).to(tl.float32)
    k_base = k_ptr + r * sk_r + h * sk_h
    v_base = v_ptr + r * sv_r + h * sv_h
    start_n = split * chunk
    end_n = tl.minimum(start_n + chunk, _visible(n, limit_ptr, HAS_LIMIT))
    # m starts finite, not -inf, so a block whose keys are all masked gives exp(-inf - m) = 0
    # instead of exp(-inf + inf) = nan; a chunk with no visible key ends with l = 0.
    m = tl.full((), -1.0e30, tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        logits = _logits(q, k_base, offs_n, offs_d, mask_d, end_n, scale, sk_n, sk_d,
                         bias_ptr + r * sb_r, sb_n, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(logits - m_new)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                    mask=(offs_n < end_n)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    part = (r * n_heads + h) * n_splits + split
    tl.store(m_ptr + part, m)
    tl.store(l_ptr + part, l)
    tl.store(acc_ptr + part * BLOCK_D + offs_d, acc)


@triton.jit
def _add_probabilities_kernel(
    q_ptr, k_ptr, bias_ptr, limit_ptr, m_ptr, l_ptr, scores_ptr,
    n, head_dim, scale, chunk,
    sq_r, sq_h, sq_d,
    sk_r, sk_h, sk_n, sk_d,
    sb_r, sb_n,
    ss_r, ss_h, ss_n,
    HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """scores += softmax probabilities of one chunk, from the merged max m and sum l of its (row, head)."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + r * sq_r + h * sq_h + offs_d * sq_d, mask=mask_d, other=0.0).to(tl.float32)
    k_base = k_ptr + r * sk_r + h * sk_h
    row_head = r * tl.num_programs(1) + h
    m = tl.load(m_ptr + row_head)
    inv_l = 1.0 / tl.load(l_ptr + row_head)
    start_n = split * chunk
    end_n = tl.minimum(start_n + chunk, _visible(n, limit_ptr, HAS_LIMIT))
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        logits = _logits(q, k_base, offs_n, offs_d, mask_d, end_n, scale, sk_n, sk_d,
                         bias_ptr + r * sb_r, sb_n, HAS_BIAS)
        # Each (row, head, chunk) belongs to one program: a plain read-add-write is race-free.
        s_ptrs = scores_ptr + r * ss_r + h * ss_h + offs_n * ss_n
        mask_n = offs_n < end_n
        tl.store(s_ptrs, tl.load(s_ptrs, mask=mask_n, other=0.0) + tl.exp(logits - m) * inv_l, mask=mask_n)


def default_splits(rows_heads: int, n: int, block_n: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, each with at least 4 blocks of keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(2 * sms, rows_heads), triton.cdiv(n, 4 * block_n)))


def attend_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  scores_out: torch.Tensor | None = None,
                  block_n: int = 32, num_splits: int | None = None,
                  n_visible: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention with the Triton kernels; same contract as `attention.attend`.

    q [R, H, 1, D]; k, v [R, H, n, D] (any strides); bias [R or 1, 1, 1, n] additive or None;
    scores_out [R, H, n] fp32, probabilities added into it when given. Returns [R, H, 1, D]
    in q's dtype. block_n: keys per loop step, a power of two (32 with D=64 keeps the
    registers of this memory-bound loop low on sm_80). num_splits: chunks of the sequence,
    each its own program (default: enough to fill the GPU). n_visible: a 0-dim integer device
    tensor; keys from there on are not read (the bias must hide them too, as the torch path
    reads them).
    """
    R, H, one, D = q.shape
    n = k.size(2)
    assert one == 1, "decode attention takes one query per row"
    assert k.shape == v.shape == (R, H, n, D), (tuple(k.shape), tuple(v.shape))
    if bias is not None:
        assert bias.shape[1:] == (1, 1, n) and bias.size(0) in (1, R), tuple(bias.shape)
    if scores_out is not None:
        assert scores_out.shape == (R, H, n) and scores_out.dtype == torch.float32
    splits = num_splits or default_splits(R * H, n, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n  # whole blocks per split
    splits = triton.cdiv(n, chunk)
    block_d = triton.next_power_of_2(D)
    m = torch.empty(R, H, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(R, H, splits, block_d, dtype=torch.float32, device=q.device)
    # An absent bias: the constexpr flag drops its code, any pointer will do. A bias shared by
    # all rows (the static step's slot mask) has row stride 0.
    b = bias if bias is not None else q
    sb = (bias.stride(0) if bias.size(0) > 1 else 0, bias.stride(3)) if bias is not None else (0, 0)
    limit = n_visible if n_visible is not None else m
    common = dict(HAS_BIAS=bias is not None, HAS_LIMIT=n_visible is not None, BLOCK_N=block_n, BLOCK_D=block_d,
                  enable_fp_fusion=True)  # explicit: Triton 3.9 warns when unset and 3.10 flips the default
    _decode_attention_kernel[(R, H, splits)](
        q, k, v, b, limit, m, l, acc,
        n, D, 1.0 / math.sqrt(D), chunk,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *sb, **common)
    # Merge the splits: rescale each partial to the common max.
    m_all = m.amax(dim=-1, keepdim=True)
    w = torch.exp(m - m_all)
    l_all = (l * w).sum(dim=-1)
    out = (acc[..., :D] * w.unsqueeze(-1)).sum(dim=-2) / l_all.unsqueeze(-1)
    if scores_out is not None:
        _add_probabilities_kernel[(R, H, splits)](
            q, k, b, limit, m_all.contiguous(), l_all.contiguous(), scores_out,
            n, D, 1.0 / math.sqrt(D), chunk,
            q.stride(0), q.stride(1), q.stride(3), *k.stride(), *sb, *scores_out.stride(), **common)
    return out.unsqueeze(2).to(q.dtype)
