"""A static, preallocated KV cache shared by every policy.

Per layer, K and V live in [rows, heads, capacity, head_dim] with
capacity = prefix capacity + visual_capacity. Slots are kept in generation order: the
condition tokens first (a batch's prefix may be shorter than the capacity; rows are
left-padded to the batch's longest and the key mask hides the padding), then the
surviving visual tokens, then the line being written. A line is `plan.grid_w` tokens
(a family's end-of-line tokens included). Nothing is evicted while a line is
generated; at the end of a line the policy keeps the anchors, the newest `recent_lines` lines and the best-scoring
tokens of the middle, and compacts them to the front, one layer at a time (the
gather's temporary is one layer's K, not the whole cache's). Keys are stored after
RoPE, so survivors keep their true positions; `position` holds each row's RoPE
position of the next token (the model sets it at the prefill, the cache counts on).

Two ways to run a decode step. `attend` + `advance` (dynamic): attention reads only
the filled slots, counters are Python ints. `attend_static` + `advance_static`
(static): slots are written by index at the device counter `fill`, attention runs
over all `capacity` slots with a mask (`step_bias`), nothing goes back to the host,
so the step has one shape per batch size and can be compiled or captured as a CUDA
graph; `commit_static` then does the host side (counters, eviction at a line end).

This module sees only the heads it is given (a tensor-parallel rank's own heads);
head-aggregated selection sums the scores over the group with `reduce_scores`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
                 cfg_rows: bool = False, reduce_scores: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """prefix_len: the prefix capacity (the longest prefix a batch may have; `reset` takes a
        batch's own). reduce_scores: sums a tensor over the tensor-parallel group in place (the
        model's `tp.all_reduce`); head_aggregate needs it so that every rank selects by all heads,
        not only its own. None on one rank."""
        self.plan = plan
        self.prefix_capacity = self.prefix_len = prefix_len
        self.n_layers, self.heads, self.head_dim = n_layers, heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.reduce_scores = reduce_scores
        self.capacity = prefix_len + plan.visual_capacity
        self._grid_ids = torch.arange(plan.image_tokens, dtype=torch.int32, device=device)
        self._slot_ids = torch.arange(self.capacity, device=device)
        # Device-side counters of the static-shape step (`attend_static`); `n` and
        # `visual_written` are their host mirrors, which eviction and the dynamic path use.
        self.fill = torch.zeros((), dtype=torch.long, device=device)  # filled slots
        self.written = torch.zeros((), dtype=torch.long, device=device)  # grid index of the next visual token
        self.graphs: dict = {}  # captured CUDA graphs of the decode step (models/generate.py), freed with the cache
        self._allocate(rows, cfg_rows)

    def _allocate(self, rows: int, cfg_rows: bool) -> None:
        self.rows = rows
        self.cfg_rows = cfg_rows  # rows are [cond; uncond] halves
        shape = (self.n_layers, rows, self.heads, self.capacity)
        self.k = torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device)
        # Grid index of the token in each slot (-1: condition token or empty).
        self.pos = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        self.position = torch.zeros(rows, dtype=torch.long, device=self.device)  # RoPE position of the next token
        self.scores = torch.zeros(shape, dtype=torch.float32, device=self.device) if self.plan.scoring else None
        self._key_bias: torch.Tensor | None = None  # allocated by the first batch with a key mask (t2i)
        self.bias: torch.Tensor | None = None  # [rows, 1, 1, capacity] additive key mask (t2i padding), or None
        self.key_mask: torch.Tensor | None = None
        self.n = 0  # filled slots, the same for every layer, row and head
        self.visual_written = 0

    def resize(self, rows: int, cfg_rows: bool) -> None:
        """Serve a batch of another shape. The old tensors are freed before the new ones are
        allocated, so the peak stays one cache (memory plans count one)."""
        if rows != self.rows:
            self.k = self.v = self.pos = self.scores = self.bias = self._key_bias = self.position = None
            self.graphs.clear()
            self._allocate(rows, cfg_rows)
        self.cfg_rows = cfg_rows

    # -- lifecycle ---------------------------------------------------------
    def reset(self, key_mask: torch.Tensor | None = None) -> None:
        """Start a new batch. key_mask [rows, T] bool marks the condition tokens that may be attended;
        T (<= the prefix capacity) is this batch's prefix length; no mask: the whole capacity, all real."""
        if key_mask is not None and key_mask.size(1) > self.prefix_capacity:
            raise ValueError(f"a prefix of {key_mask.size(1)} tokens does not fit the cache's "
                             f"{self.prefix_capacity} condition slots (max_prefix_len)")
        self.prefix_len = self.prefix_capacity if key_mask is None else key_mask.size(1)
        self._set_fill(0, 0)
        self.position.zero_()
        self.pos.fill_(-1)
        if self.scores is not None:
            self.scores.zero_()
        self.key_mask = key_mask
        if key_mask is None:
            self.bias = None
        else:  # one preallocated buffer, so that a captured step keeps reading the current mask
            if self._key_bias is None:
                self._key_bias = torch.zeros(self.rows, 1, 1, self.capacity, device=self.k.device)
            self._key_bias.zero_()
            self._key_bias[:, 0, 0, :key_mask.size(1)].masked_fill_(~key_mask, float("-inf"))
            self.bias = self._key_bias

    def _set_fill(self, n: int, visual_written: int) -> None:
        """Set the host counters and their device copies (outside the static step)."""
        self.n, self.visual_written = n, visual_written
        self.fill.fill_(n)
        self.written.fill_(visual_written)

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

    # -- the static-shape decode step: device counters, fixed shapes, no host sync --
    def step_bias(self) -> torch.Tensor:
        """Additive mask [rows or 1, 1, 1, capacity] of a static step: the filled slots and the one
        being written are visible. Computed once per step, shared by all layers."""
        bias = torch.where(self._slot_ids <= self.fill, 0.0, float("-inf")).view(1, 1, 1, -1)
        return bias if self.bias is None else bias + self.bias

    def attend_static(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
        """One token per row: write k, v [rows, heads, 1, D] into slot `fill` by index and attend over
        all `capacity` slots; `bias` (step_bias) hides the empty ones, which get probability 0."""
        slot = self.fill.view(1)
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        scores = None if self.scores is None else self.scores[layer]
        return attend(q, self.k[layer], self.v[layer], bias, scores, n_visible=self.fill + 1)

    def advance_static(self) -> None:
        """Inside the static step, after all layers: record the token's grid index, count it."""
        # index_copy_, not index_fill_: a tensor fill value is read back to the host (.item()).
        grid_index = self.written.to(torch.int32).expand(*self.pos.shape[:3], 1)
        self.pos.index_copy_(3, self.fill.view(1), grid_index)
        self.fill.add_(1)
        self.written.add_(1)
        self.position.add_(1)

    def commit_static(self) -> None:
        """On the host after a static step: mirror the counters; compress at the end of a grid line."""
        self._commit(1, visual=True)

    # -- called once per model step, after all layers -----------------------
    def advance(self, s: int) -> None:
        """Commit the s tokens every layer just wrote; compress at the end of each grid line."""
        visual = self.n >= self.prefix_len
        if visual:
            self.pos[..., self.n:self.n + s] = self._grid_ids[self.visual_written:self.visual_written + s]
        self._commit(s, visual)
        self.fill.fill_(self.n)
        self.written.fill_(self.visual_written)
        self.position.add_(s)

    def _commit(self, s: int, visual: bool) -> None:
        self.n += s
        if visual:
            self.visual_written += s
            if self.visual_written % self.plan.grid_w == 0:
                self._end_of_line()

    def _end_of_line(self) -> None:
        plan, spec = self.plan, self.plan.spec
        P, w = self.prefix_len, plan.grid_w
        m = self.n - P  # visual slots held
        if plan.evicts and m > plan.budget:
            keep_mid = plan.budget - spec.anchor_lines * w - plan.recent_lines * w
            lo, hi = P + spec.anchor_lines * w, P + m - plan.recent_lines * w  # the middle: candidates
            dev = self.k.device
            anchors = torch.arange(P, lo, device=dev).expand(self.rows, self.heads, -1)
            recent = torch.arange(hi, P + m, device=dev).expand(self.rows, self.heads, -1)
            # One layer at a time: the gathers' temporaries are one layer's, not the whole cache's.
            for layer in range(self.n_layers):
                parts = [anchors]
                if keep_mid > 0:
                    s = self._selection_scores(layer, lo, hi)
                    parts.append(s.topk(keep_mid, dim=-1, sorted=False).indices.sort(dim=-1).values + lo)
                parts.append(recent)
                self._compact(layer, torch.cat(parts, dim=-1))  # [rows, heads, budget] slots in generation order
            self._set_fill(P + plan.budget, self.visual_written)
        if plan.scoring == "line" and self.scores is not None:
            if spec.score_decay:  # older lines' attention fades instead of being forgotten
                self.scores.mul_(spec.score_decay)
            else:
                self.scores.zero_()

    def _selection_scores(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        """One layer's scores of candidate slots [lo, hi) as [rows, heads, hi - lo], after pooling and sharing."""
        spec = self.plan.spec
        s = self.scores[layer, :, :, lo:hi]
        if spec.pool > 1:
            s = self._pool(s, self.pos[layer, :, :, lo:hi].long())
        if spec.head_aggregate:
            s = s.sum(dim=1, keepdim=True)
            if self.reduce_scores is not None:  # add the other ranks' heads: every rank selects alike
                s = self.reduce_scores(s)
            s = s.expand(-1, self.heads, -1)
        if spec.cfg_shared and self.cfg_rows:
            half = self.rows // 2
            s = torch.cat([s[:half], s[:half]])
        return s

    def _pool(self, s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Sum each candidate's score over its k x k grid neighbourhood (evicted cells count 0)."""
        h, w, k = self.plan.grid_h, self.plan.grid_w, self.plan.spec.pool
        flat = s.reshape(-1, s.size(-1))
        grid = torch.zeros(flat.size(0), h * w, device=s.device).scatter_(1, pos.reshape(flat.shape), flat)
        pooled = F.avg_pool2d(grid.view(-1, 1, h, w), k, stride=1, padding=k // 2,
                              count_include_pad=True) * (k * k)
        return pooled.view(flat.size(0), h * w).gather(1, pos.reshape(flat.shape)).view_as(s)

    def _compact(self, layer: int, idx: torch.Tensor) -> None:
        """Move one layer's kept slots (idx [rows, heads, n]) to the front of its visual region."""
        P, n = self.prefix_len, idx.size(-1)
        gidx = idx.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        for buf in (self.k[layer], self.v[layer]):
            buf[:, :, P:P + n] = buf.gather(2, gidx)
        pos = self.pos[layer]
        pos[..., P:P + n] = pos.gather(2, idx)
        pos[..., P + n:] = -1
        if self.scores is not None:
            scores = self.scores[layer]
            scores[..., P:P + n] = scores.gather(2, idx)
            scores[..., P + n:] = 0

    # -- introspection ------------------------------------------------------
    def memory(self) -> MemoryReport:
        kv = self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()
        meta = self.pos.untyped_storage().nbytes()
        if self.scores is not None:
            meta += self.scores.untyped_storage().nbytes()
        if self._key_bias is not None:
            meta += self._key_bias.untyped_storage().nbytes()
        return MemoryReport(kv_bytes=kv, kv_bytes_per_layer=kv // self.k.size(0), meta_bytes=meta,
                            slots=self.capacity, rows=self.rows, heads=self.heads)

    def kept_positions(self, layer: int) -> torch.Tensor:
        """Grid indices held for a layer, [rows, heads, n_visual] (for tests and plots)."""
        return self.pos[layer, :, :, self.prefix_len:self.n]
