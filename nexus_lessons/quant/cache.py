"""QuantizedKVCache: the reference docs' quantized cache, sized like lesson 01's `KVCache`.

`QuantizedKVCache(num_layers, max_batch_size, max_seq_len, num_heads, head_dim, bits=8 | 4)` takes all its
memory up front, like `KVCache`: every batch row owns one contiguous run of blocks that holds
`max_seq_len` tokens. Underneath it is the quantized paged pool (`PagedKVCache(kv_cache_dtype="int8" |
"int4")`), because that is what the dequantizing kernels read; each row's blocks are reserved in order
when the batch starts, so its block table is the identity on its own region (a contiguous cache is a
paged cache whose block tables never need to be looked at).
"""

from __future__ import annotations

import math

import torch

from ..kv_cache import CacheFullError, _check_positive
from ..paged import PagedKVCache

BITS = {8: "int8", 4: "int4"}


class QuantizedKVCache(PagedKVCache):
    """A static quantized KV cache: ``bits=8`` (int8 per token and head) or ``bits=4`` (int4, KIVI).

    ``dtype`` is the compute dtype (what the model hands over and gets back). ``block_size`` (default 16
    for 8 bits, 64 for 4: int4's key quantization group) rarely needs changing.
    """

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        *,
        bits: int = 8,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        block_size: int | None = None,
    ) -> None:
        if bits not in BITS or isinstance(bits, bool):
            raise ValueError(f"bits must be 8 (int8) or 4 (int4, KIVI), got {bits!r}; fp8 is "
                             "PagedKVCache(kv_cache_dtype='fp8')")  # fmt: skip
        _check_positive(max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        block_size = block_size or (64 if bits == 4 else 16)
        _check_positive(block_size=block_size)
        self.bits, self.max_batch_size, self.max_seq_len = bits, max_batch_size, max_seq_len
        self.blocks_per_row = math.ceil(max_seq_len / block_size)
        super().__init__(num_layers, num_heads, head_dim, block_size, max_batch_size * self.blocks_per_row,
                         dtype=dtype, device=device, kv_cache_dtype=BITS[bits])  # fmt: skip
        self.quant.reserve_tail_slots(max_batch_size)  # int4: one unfilled block per row

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_seq_len: int, bits: int = 8) -> QuantizedKVCache:  # type: ignore[override]
        c = model.config
        return cls(c.num_hidden_layers, max_batch_size, max_seq_len, c.num_key_value_heads, c.head_dim, bits=bits,
                   dtype=model.dtype, device=model.device)  # fmt: skip

    def begin_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if self.seq_len + T > self.max_seq_len:
            raise CacheFullError(f"{self.seq_len + T} tokens would not fit: the cache's max_seq_len is "
                                 f"{self.max_seq_len} ({self.seq_len} held, {T} new)")  # fmt: skip
        if self._rows is None:
            if B > self.max_batch_size:
                raise ValueError(f"batch of {B} is larger than the cache's max_batch_size {self.max_batch_size}")
            rows = [self.add_sequence() for _ in range(B)]
            for s in rows:  # one run of consecutive blocks per row: the lowest free ids, in order
                self.append_slots(s, self.blocks_per_row * self.block_size)
            self.bind(rows)
        return super().begin_forward(input_ids, attention_mask)

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(layers={self.num_layers}, max_batch_size={self.max_batch_size}, "
                f"max_seq_len={self.max_seq_len}, kv_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"bits={self.bits}, block_size={self.block_size}, dtype={self.dtype}, device={self.device})")  # fmt: skip
