"""LlamaGen's published decode attention, as a drop-in cache for `generate_tokens` (benchmarks only).

FoundationVision/LlamaGen keeps a static cache of max_seq_length rounded up to a
multiple of 8, writes each step at input_pos, copies K and V with
repeat_interleave (a no-op copy when kv heads == heads), and attends over the whole
padded buffer with a boolean causal mask. This reproduces that so the benchmark
compares the same model, loop, batch and dtype, with only the attention differing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lineray.cache import MemoryReport


class PaddedStaticCache:
    def __init__(self, model, rows: int):
        cfg = model.config
        w = model.tok_embeddings.weight
        seq = cfg.prefix_len + cfg.image_tokens
        seq += -seq % 8  # LlamaGen: find_multiple(max_seq_length, 8)
        self.rows, self.heads = rows, model.local_heads
        shape = (cfg.n_layer, rows, model.local_heads, seq, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=w.device))
        self.n = 0

    def reset(self, key_mask=None) -> None:
        self.n = 0

    def attend(self, layer: int, q, k, v):
        pos = torch.arange(self.n, self.n + k.size(2), device=k.device)
        self.k[layer][:, :, pos] = k
        self.v[layer][:, :, pos] = v
        keys = self.k[layer].repeat_interleave(1, dim=1)
        values = self.v[layer].repeat_interleave(1, dim=1)
        mask = self.causal[pos][None, None].expand(self.rows, 1, -1, -1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def advance(self, s: int) -> None:
        self.n += s

    def memory(self) -> MemoryReport:
        kv = self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()
        return MemoryReport(kv, kv // self.k.size(0), self.causal.untyped_storage().nbytes(), self.k.size(3),
                            self.rows, self.heads)
