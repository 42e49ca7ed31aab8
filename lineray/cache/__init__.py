"""KV cache policies: full, LineAR (`linear`), window and heavy-hitter, with memory accounting."""
from lineray.cache.kv import KVCache, MemoryReport
from lineray.cache.spec import POLICIES, CacheConfigError, CachePlan, CacheSpec, parse_fraction

__all__ = ["KVCache", "MemoryReport", "POLICIES", "CacheConfigError", "CachePlan", "CacheSpec", "parse_fraction"]
