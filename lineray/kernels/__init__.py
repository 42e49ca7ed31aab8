"""Numerical building blocks: 2D RoPE, attention over a compacted KV cache, sampling."""
