"""Rotary position embedding: LlamaGen's 2D grid table and Llama's 1D table, two rotation layouts.

2D (LlamaGen): of the head_dim/2 rotation pairs, the first half rotate by the token's
grid row, the second half by its grid column (row-major order). The condition tokens
get an all-zero table, so their rotated q and k are exactly zero (every query gives
each condition key the logit 0); that is LlamaGen's behaviour and we keep it.

1D (Llama, Janus-Pro, Chameleon): pair j rotates by position * base^(-2j/head_dim).

A table is [positions, head_dim/2, 2] of (cos, sin) in fp32. Which two features form
pair j is the checkpoint's layout, not the table's: "interleaved" rotates (x[2j],
x[2j+1]) (LlamaGen, Meta's Llama), "half" rotates (x[j], x[j + head_dim/2]) (HF Llama's
rotate_half: Janus, Chameleon). The kernel rotates in the checkpoint's own layout, so
no weight is permuted at load time.
"""
from __future__ import annotations

import torch

ROPE_KINDS = ("2d", "1d")
ROPE_STYLES = ("interleaved", "half")


def rope_table_2d(grid_h: int, grid_w: int, head_dim: int, base: float = 10000.0,
                  prefix_len: int = 0) -> torch.Tensor:
    """Return [prefix_len + grid_h*grid_w, head_dim//2, 2] of (cos, sin) pairs."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    n_freq = half // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[:n_freq].float() / half))
    rows = torch.outer(torch.arange(grid_h).float(), freqs)  # [h, n_freq]
    cols = torch.outer(torch.arange(grid_w).float(), freqs)  # [w, n_freq]
    grid = torch.cat([rows[:, None, :].expand(-1, grid_w, -1),
                      cols[None, :, :].expand(grid_h, -1, -1)], dim=-1)  # [h, w, half]
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # [h*w, half, 2]
    return torch.cat([torch.zeros(prefix_len, half, 2), table])


def rope_table_1d(length: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Return [length, head_dim//2, 2] of (cos, sin) for positions 0..length-1 (HF Llama's default RoPE)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), inv_freq)  # [length, head_dim/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor, style: str = "interleaved") -> torch.Tensor:
    """Rotate x [B, S, H, D] by table [S, D/2, 2] (the same for every row) or [B, S, D/2, 2]
    (per-row positions), computed in fp32. style: which features pair up (module docstring)."""
    xf = x.float()
    if style == "interleaved":
        xs = xf.reshape(*x.shape[:-1], -1, 2)
        a, b = xs[..., 0], xs[..., 1]
    elif style == "half":
        a, b = xf.chunk(2, dim=-1)
    else:
        raise ValueError(f"unknown RoPE style {style!r}; choose one of {', '.join(ROPE_STYLES)}")
    t = table.view(-1 if table.dim() == 4 else 1, a.size(1), 1, a.size(3), 2)
    cos, sin = t[..., 0], t[..., 1]
    rotated = (a * cos - b * sin, b * cos + a * sin)
    if style == "interleaved":
        return torch.stack(rotated, dim=-1).flatten(3).type_as(x)
    return torch.cat(rotated, dim=-1).type_as(x)
