"""2D rotary position embedding as LlamaGen defines it.

Of the head_dim/2 rotation pairs, the first half rotate by the token's grid row,
the second half by its grid column (row-major order). The condition tokens get an
all-zero table, so their rotated q and k are exactly zero (every query gives each
condition key the logit 0); that is LlamaGen's behaviour and we keep it.
"""
from __future__ import annotations

import torch


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


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by table [S, D/2, 2] (interleaved pairs), computed in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)
