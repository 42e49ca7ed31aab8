"""A static, preallocated KV cache shared by every policy.

Per layer, K and V live in [rows, heads, capacity, head_dim] with
capacity = prefix + visual_capacity. Slots are kept in generation order: the
condition tokens first, then the surviving visual tokens, then the line being
written. Nothing is evicted while a line is generated; at the end of a line the
policy keeps the anchors, the newest `recent_lines` lines and the best-scoring
tokens of the middle, and compacts them to the front with one gather. Keys are
stored after RoPE, so survivors keep their true positions.

This module sees only the heads it is given (a tensor-parallel rank's own heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lineray.cache.spec import CachePlan
from lineray.kernels.attention import attend, attend_causal


@dataclass(frozen=True)
class MemoryReport:
    kv_bytes: int  # K + V storage actually allocated, all layers
    kv_bytes_per_layer: int
    meta_bytes: int  # positions, scores, mask
    slots: int  # capacity per (row, head)
    rows: int
    heads: int

    def __str__(self) -> str:
        return (f"K/V {self.kv_bytes / 2**20:.1f} MiB ({self.slots} slots x {self.rows} rows x {self.heads} heads), "
                f"metadata {self.meta_bytes / 2**20:.1f} MiB")


class KVCache:
    def __init__(self, plan: CachePlan, *, n_layers: int, rows: int, heads: int, head_dim: int,
                 prefix_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 cfg_rows: bool = False):
        self.plan = plan
        self.prefix_len = prefix_len
        self.rows, self.heads, self.head_dim = rows, heads, head_dim
        self.cfg_rows = cfg_rows  # rows are [cond; uncond] halves
        self.capacity = prefix_len + plan.visual_capacity
        shape = (n_layers, rows, heads, self.capacity)
        self.k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        # Grid index of the token in each slot (-1: condition token or empty).
        self.pos = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.scores = torch.zeros(shape, dtype=torch.float32, device=device) if plan.scoring else None
        self.bias: torch.Tensor | None = None  # [rows, 1, 1, capacity] additive key mask (t2i padding)
        self.key_mask: torch.Tensor | None = None
        self._grid_ids = torch.arange(plan.image_tokens, dtype=torch.int32, device=device)
        self.n = 0  # filled slots, the same for every layer, row and head
        self.visual_written = 0

    # -- lifecycle ---------------------------------------------------------
    def reset(self, key_mask: torch.Tensor | None = None) -> None:
        """Start a new batch. key_mask [rows, prefix_len] bool marks condition tokens that may be attended."""
        self.n = 0
        self.visual_written = 0
        self.pos.fill_(-1)
        if self.scores is not None:
            self.scores.zero_()
        self.key_mask = key_mask
        if key_mask is None:
            self.bias = None
        else:
            bias = torch.zeros(self.rows, 1, 1, self.capacity, device=self.k.device)
            bias[:, 0, 0, :self.prefix_len].masked_fill_(~key_mask, float("-inf"))
            self.bias = bias

    # -- called by each attention layer ------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k, v [rows, heads, S, D] at the end and attend q over everything filled."""
        s = k.size(2)
        end = self.n + s
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > {self.capacity} slots")
        self.k[layer, :, :, self.n:end] = k
        self.v[layer, :, :, self.n:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if s > 1:  # prefill: causal over the block
            mask = None
            if self.key_mask is not None:
                mask = torch.ones(self.rows, end, dtype=torch.bool, device=q.device)
                mask[:, :self.prefix_len] = self.key_mask
            return attend_causal(q, keys, values, mask)
        bias = None if self.bias is None else self.bias[..., :end]
        scores = None if self.scores is None else self.scores[layer, :, :, :end]
        return attend(q, keys, values, bias, scores)

    # -- called once per model step, after all layers -----------------------
    def advance(self, s: int) -> None:
        """Commit the s tokens every layer just wrote; compress at the end of each grid line."""
        first_visual = self.n >= self.prefix_len
        if first_visual:
            self.pos[..., self.n:self.n + s] = self._grid_ids[self.visual_written:self.visual_written + s]
            self.visual_written += s
        self.n += s
        w = self.plan.grid_w
        if first_visual and self.visual_written % w == 0:
            self._end_of_line()

    def _end_of_line(self) -> None:
        plan, spec = self.plan, self.plan.spec
        P, w = self.prefix_len, plan.grid_w
        m = self.n - P  # visual slots held
        if plan.evicts and m > plan.budget:
            anchors = spec.anchor_lines * w
            recent = plan.recent_lines * w
            keep_mid = plan.budget - anchors - recent
            dev = self.k.device
            L = self.k.size(0)
            parts = [torch.arange(P, P + anchors, device=dev).expand(L, self.rows, self.heads, -1)]
            if keep_mid > 0:
                lo, hi = P + anchors, P + m - recent
                s = self._selection_scores(lo, hi)
                top = s.topk(keep_mid, dim=-1, sorted=False).indices.sort(dim=-1).values + lo
                parts.append(top)
            parts.append(torch.arange(P + m - recent, P + m, device=dev).expand(L, self.rows, self.heads, -1))
            idx = torch.cat(parts, dim=-1)  # [L, rows, heads, budget] slot ids in generation order
            self._compact(idx)
            self.n = P + plan.budget
        if plan.scoring == "line" and self.scores is not None:
            self.scores.zero_()

    def _selection_scores(self, lo: int, hi: int) -> torch.Tensor:
        """Scores of candidate slots [lo, hi) as [L, rows, heads, hi - lo], after the configured pooling."""
        spec = self.plan.spec
        s = self.scores[..., lo:hi]
        if spec.pool > 1:
            s = self._pool(s, self.pos[..., lo:hi].long())
        if spec.head_aggregate:
            s = s.sum(dim=2, keepdim=True).expand_as(s)
        if spec.cfg_shared and self.cfg_rows:
            half = self.rows // 2
            s = torch.cat([s[:, :half], s[:, :half]], dim=1)
        return s

    def _pool(self, s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Sum each candidate's score over its k x k grid neighbourhood (evicted cells count 0)."""
        h, w, k = self.plan.grid_h, self.plan.grid_w, self.plan.spec.pool
        flat = s.reshape(-1, s.size(-1))
        grid = torch.zeros(flat.size(0), h * w, device=s.device).scatter_(1, pos.reshape(flat.shape), flat)
        pooled = F.avg_pool2d(grid.view(-1, 1, h, w), k, stride=1, padding=k // 2,
                              count_include_pad=True) * (k * k)
        return pooled.view(flat.size(0), h * w).gather(1, pos.reshape(flat.shape)).view_as(s)

    def _compact(self, idx: torch.Tensor) -> None:
        """Move the kept slots (idx [L, rows, heads, n]) to the front of the visual region."""
        P, n = self.prefix_len, idx.size(-1)
        gidx = idx.unsqueeze(-1).expand(-1, -1, -1, -1, self.head_dim)
        self.k[..., P:P + n, :] = self.k.gather(3, gidx)
        self.v[..., P:P + n, :] = self.v.gather(3, gidx)
        self.pos[..., P:P + n] = self.pos.gather(3, idx)
        self.pos[..., P + n:] = -1
        if self.scores is not None:
            self.scores[..., P:P + n] = self.scores.gather(3, idx)
            self.scores[..., P + n:] = 0

    # -- introspection ------------------------------------------------------
    def memory(self) -> MemoryReport:
        kv = self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()
        meta = self.pos.untyped_storage().nbytes()
        if self.scores is not None:
            meta += self.scores.untyped_storage().nbytes()
        if self.bias is not None:
            meta += self.bias.untyped_storage().nbytes()
        return MemoryReport(kv_bytes=kv, kv_bytes_per_layer=kv // self.k.size(0), meta_bytes=meta,
                            slots=self.capacity, rows=self.rows, heads=self.heads)

    def kept_positions(self, layer: int) -> torch.Tensor:
        """Grid indices held for a layer, [rows, heads, n_visual] (for tests and plots)."""
        return self.pos[layer, :, :, self.prefix_len:self.n]
