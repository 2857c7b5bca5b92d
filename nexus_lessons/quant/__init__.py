"""Quantized KV cache (lesson 03): `QuantizedKVCache` (sized like lesson 01's `KVCache`) and the quantized
pools behind `PagedKVCache(kv_cache_dtype=...)`; the formats and kernels are in `nexus_lessons.kernels`
(`quant_reference.py` beside `quant_write.py` / `quant_attention.py`, checked entry points in `quant.py`).
"""

from .cache import QuantizedKVCache
from .pool import KV_CACHE_DTYPES, QuantizedPool

__all__ = ["KV_CACHE_DTYPES", "QuantizedKVCache", "QuantizedPool"]
