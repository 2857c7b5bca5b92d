"""Contiguous KV caches: a preallocated static one (gpt-fast style) and a growing dynamic one (HF style).

Both keep the same bookkeeping: `seq_len` slots are used along the time axis, `key_valid[b, j]` says
whether slot j of row b holds a real token (left padding does not), and the RoPE position of a new
token is the number of real tokens before it. Prompts of different lengths are left-padded, so every
row of a batch advances together and one slice serves the whole batch.
"""

from __future__ import annotations

import torch

from .attention import attention_mask, sdpa
from .config import as_device, as_dtype


class CacheFullError(RuntimeError):
    """Raised when a forward would write past the cache's capacity."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class _ContiguousCache:
    """Slot bookkeeping shared by the static and dynamic caches."""

    max_seq_len: int | None
    max_batch_size: int | None

    def _reset_bookkeeping(self) -> None:
        self.seq_len = 0  # slots used along time (padding included)
        self.batch_size = 0  # rows in use, fixed by the first forward after reset()
        self._start = 0
        self._mask: torch.Tensor | None = None
        self._causal = False

    def reset(self) -> None:
        """Forget every token; the memory is kept for reuse."""
        self._reset_bookkeeping()

    def _key_valid(self, rows: int, end: int) -> torch.Tensor:
        raise NotImplementedError

    def _reserve(self, rows: int, end: int, device: torch.device) -> None:
        raise NotImplementedError

    def begin_forward(self, input_ids: torch.Tensor, attention_mask_: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve slots for T new tokens per row; return their RoPE positions [B, T]."""
        B, T = input_ids.shape
        if self.seq_len == 0:
            if self.max_batch_size is not None and B > self.max_batch_size:
                raise ValueError(f"batch of {B} is larger than the cache's max_batch_size {self.max_batch_size}")
            self.batch_size = B
        elif B != self.batch_size:
            raise ValueError(f"this cache holds {self.batch_size} rows; got a batch of {B} (call reset() first)")
        start, end = self.seq_len, self.seq_len + T
        if self.max_seq_len is not None and end > self.max_seq_len:
            raise CacheFullError(
                f"{end} tokens would not fit: the cache's max_seq_len is {self.max_seq_len} "
                f"({start} held, {T} new)"
            )
        self._reserve(B, end, input_ids.device)
        new_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask_ is None else attention_mask_.bool()
        key_valid = self._key_valid(B, end)
        key_valid[:, start:end] = new_valid
        before = key_valid[:, :start].sum(-1, keepdim=True)
        positions = (before + new_valid.long().cumsum(-1) - 1).clamp(min=0)
        self._start, self.seq_len = start, end
        # Mask only when needed: a decode step over an unpadded batch sees every key.
        has_padding = not bool(key_valid.all())
        if not has_padding and (T == 1 or start == 0):
            self._mask, self._causal = None, T > 1
        else:
            slots = torch.arange(start, end, device=input_ids.device).expand(B, T)
            self._mask, self._causal = attention_mask(slots, key_valid), False
        return positions

    def crop(self, length: int) -> None:
        """Drop every slot from `length` on (speculative decoding rolls back rejected tokens this way)."""
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"cannot crop to {length}: the cache holds {self.seq_len} slots")
        if self.seq_len:
            self._key_valid(self.batch_size, self.seq_len)[:, length:] = False
        self.seq_len = length


class KVCache(_ContiguousCache):
    """A static cache: K and V preallocated as [num_layers, max_batch_size, num_heads, max_seq_len, head_dim].

    Memory is fixed up front (2 x L x B x H x S x D elements) whether or not it is used: the price of
    never reallocating, and what makes CUDA graphs and torch.compile possible. `num_heads` is the
    number of *key/value* heads (fewer than query heads under GQA).
    """

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _check_positive(num_layers=num_layers, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        num_heads=num_heads, head_dim=head_dim)
        self.num_layers, self.max_batch_size, self.max_seq_len = num_layers, max_batch_size, max_seq_len
        self.num_heads, self.head_dim = num_heads, head_dim
        dtype, device = as_dtype(dtype) or torch.get_default_dtype(), as_device(device)
        shape = (num_layers, max_batch_size, num_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(max_batch_size, max_seq_len, dtype=torch.bool, device=device)
        self._reset_bookkeeping()

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_seq_len: int) -> "KVCache":
        c = model.config
        return cls(c.num_hidden_layers, max_batch_size, max_seq_len, c.num_key_value_heads, c.head_dim,
                   dtype=model.dtype, device=model.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V (all of it, used or not)."""
        return sum(t.nbytes for t in [*self.k, *self.v])

    def reset(self) -> None:
        self.key_valid.zero_()
        self._reset_bookkeeping()

    def _key_valid(self, rows: int, end: int) -> torch.Tensor:
        return self.key_valid[:rows, :end]

    def _reserve(self, rows: int, end: int, device: torch.device) -> None:
        if device != self.device:
            raise ValueError(f"input is on {device} but the cache is on {self.device}")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.dtype != self.dtype:
            raise TypeError(f"the cache holds {self.dtype} but the model gives {k.dtype}; build it with dtype={k.dtype}")
        if k.shape[1] != self.num_heads or k.shape[-1] != self.head_dim:
            raise ValueError(f"cache is for {self.num_heads} KV heads of dim {self.head_dim}; got k {tuple(k.shape)}")
        B, s, e = k.shape[0], self._start, self.seq_len
        self.k[layer][:B, :, s:e] = k
        self.v[layer][:B, :, s:e] = v
        return sdpa(q, self.k[layer][:B, :, :e], self.v[layer][:B, :, :e], self._mask, self._causal)


class DynamicKVCache(_ContiguousCache):
    """A cache that grows with `torch.cat` each step (what transformers' DynamicCache does).

    Nothing is reserved up front, so memory tracks the real length; the price is a new allocation and a
    full copy of every layer's K/V per step, O(T^2) bytes moved over a generation.
    """

    def __init__(self, max_seq_len: int | None = None, max_batch_size: int | None = None) -> None:
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.key_valid = torch.zeros(0, 0, dtype=torch.bool)
        self._reset_bookkeeping()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)

    def reset(self) -> None:
        self.k, self.v = [], []
        self.key_valid = torch.zeros(0, 0, dtype=torch.bool)
        self._reset_bookkeeping()

    def _key_valid(self, rows: int, end: int) -> torch.Tensor:
        return self.key_valid[:rows, :end]

    def _reserve(self, rows: int, end: int, device: torch.device) -> None:
        kv = self.key_valid
        if kv.shape[1] < end or kv.device != device:
            grown = torch.zeros(rows, end, dtype=torch.bool, device=device)
            grown[: kv.shape[0], : kv.shape[1]] = kv.to(device)
            self.key_valid = grown

    def crop(self, length: int) -> None:
        super().crop(length)
        self.k = [t[:, :, :length] if t is not None else None for t in self.k]
        self.v = [t[:, :, :length] if t is not None else None for t in self.v]
        self.key_valid = self.key_valid[:, :length]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is not None and old_k.dtype != k.dtype:
            raise TypeError(f"the cache holds {old_k.dtype} but the model gives {k.dtype}")
        self.k[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.v[layer] = v if old_v is None else torch.cat([old_v, v], dim=2)
        return sdpa(q, self.k[layer], self.v[layer], self._mask, self._causal)
