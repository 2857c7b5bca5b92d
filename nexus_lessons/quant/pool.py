"""The quantized storage behind `PagedKVCache(kv_cache_dtype="int8" | "fp8" | "int4")`.

Every layer's blocks and their scales are stacked along a leading layer dimension (``data["k"][layer]``
is one layer's pool), so copy-on-write copies a block in every layer with one op per tensor, and
``layer(i)`` hands the kernels one layer as a `QuantizedKV`.

int4's tail (KIVI's full-precision residual, in blocks). A block is quantized when its last token is
written; until then its tokens live in full precision in a *tail slot*, one ``[block_size, H, D]`` row
of a small pool that grows on demand. Tail slots belong to block ids (``tail_of[block]``), so
copy-on-write copies a shared, partly filled block's tail with it. Each forward's `plan` works out, on
the host from the block tables, which blocks fill in this step (the write kernel quantizes them from
their tail rows and the new rows), which tail slot each sequence's unfilled block uses, and frees the
slots no live sequence needs any more. A sequence cut back into a block that was already quantized
(speculative decoding's rollback) gets that block's kept rows back in a tail slot, dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.quant import int4_write_kv, quant_decode_attention, quant_extend_attention, quant_write_kv
from ..kernels.quant_reference import (
    FORMATS,
    QuantizedKV,
    dequantize_k_int4,
    dequantize_v_int4,
    empty_quantized_kv,
)

KV_CACHE_DTYPES = ("auto", *FORMATS)


def check_kv_cache_dtype(kv_cache_dtype: str, head_dim: int) -> None:
    """Clear errors for formats that cannot be built here."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"kv_cache_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1); this is torch {torch.__version__}")
    if kv_cache_dtype == "int4" and head_dim % 2:
        raise ValueError(f"kv_cache_dtype='int4' packs two channels per byte: head_dim must be even, got {head_dim}")


@dataclass
class QuantPlan:
    """int4's per-forward metadata (device tensors), built once for every layer."""

    tail_mapping: torch.Tensor  # [N] int64: tail slot * block_size + offset of each new row, -1: quantized now
    completions: torch.Tensor  # [C, 4] int32: (block, tail slot or -1, rows in it, first new row)
    tail_slots: torch.Tensor  # [B_active] int32: each row's unfilled block's tail slot after the write, -1: none


class QuantizedPool:
    """All layers' quantized K/V blocks, their scales, and (int4) the tail slots."""

    def __init__(self, fmt: str, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device, num_tail_slots: int = 1) -> None:  # fmt: skip
        check_kv_cache_dtype(fmt, head_dim)
        if fmt == "auto":
            raise ValueError("QuantizedPool holds a quantized format, not 'auto'")
        self.fmt, self.num_layers, self.block_size = fmt, num_layers, block_size
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        one = empty_quantized_kv(fmt, num_blocks, block_size, num_heads, head_dim, dtype=dtype, device=device,
                                 num_tail=num_tail_slots if fmt == "int4" else 0)  # fmt: skip
        self.data = {name: t[None].repeat(num_layers, *([1] * t.dim())) for name, t in one.tensors().items()}
        self.tail_of: dict[int, int] = {}  # block id -> tail slot (int4: the blocks being filled)
        self._free_tails: list[int] = list(range(num_tail_slots - 1, -1, -1)) if fmt == "int4" else []

    def layer(self, i: int) -> QuantizedKV:
        return QuantizedKV(self.fmt, **{name: t[i] for name, t in self.data.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.data.values())

    @property
    def num_tail_slots(self) -> int:
        return self.data["k_tail"].shape[1] if self.fmt == "int4" else 0

    # --- tail slots --------------------------------------------------------------------------------------
    def reserve_tail_slots(self, n: int) -> None:
        """Grow the tail pool to at least n slots (one per sequence that can be live at once). It also grows
        by doubling when a forward needs more, on the host before any layer runs; a caller that captures
        CUDA graphs reserves up front so the tensors never move."""
        old = self.num_tail_slots
        if self.fmt != "int4" or n <= old:
            return
        for name in ("k_tail", "v_tail"):
            t = self.data[name]
            self.data[name] = torch.cat([t, t.new_zeros(t.shape[0], n - old, *t.shape[2:])], dim=1)
        self._free_tails = list(range(n - 1, old - 1, -1)) + self._free_tails

    def _take_tail(self) -> int:
        if not self._free_tails:
            self.reserve_tail_slots(2 * self.num_tail_slots)
        return self._free_tails.pop()

    def _release_unneeded(self, needed: set[int]) -> None:
        for block in [b for b in self.tail_of if b not in needed]:
            self._free_tails.append(self.tail_of.pop(block))

    def _restore_tail(self, block: int, rows: int) -> int:
        """A quantized block that became partly filled again (a sequence cut back into it): its first
        ``rows`` tokens, dequantized, into a new tail slot of every layer."""
        slot = self._take_tail()
        d = self.data
        k = dequantize_k_int4(d["k"][:, block, :rows], d["k_scale"][:, block][:, None], d["k_zero"][:, block][:, None])
        v = dequantize_v_int4(d["v"][:, block, :rows], d["v_scale"][:, block, :rows])
        d["k_tail"][:, slot, :rows] = k.to(self.dtype)
        d["v_tail"][:, slot, :rows] = v.to(self.dtype)
        self.tail_of[block] = slot
        return slot

    # --- copy-on-write -----------------------------------------------------------------------------------
    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks src -> dst in every layer (data and scales; int4: a shared tail too)."""
        s = torch.tensor(src, device=self.data["k"].device)
        d = torch.tensor(dst, device=self.data["k"].device)
        for name, t in self.data.items():
            if not name.endswith("_tail"):
                t[:, d] = t[:, s]
        for a, b in zip(src, dst):
            if a in self.tail_of:
                slot = self._take_tail()
                for name in ("k_tail", "v_tail"):
                    self.data[name][:, slot] = self.data[name][:, self.tail_of[a]]
                self.tail_of[b] = slot

    # --- one forward ---------------------------------------------------------------------------------------
    def plan(self, tables: list[list[int]], done: list[int], counts: list[int], live: dict[int, tuple[list[int], int]],
             device) -> QuantPlan | None:  # fmt: skip
        """int4 metadata for one forward. ``tables``/``done``/``counts``: the active rows' block tables,
        tokens already written and new tokens (packed in this order); ``live``: every live sequence's
        (blocks, tokens written after this forward), to free the tail slots nobody needs."""
        if self.fmt != "int4":
            return None
        bs = self.block_size
        needed = {blocks[n // bs] for blocks, n in live.values() if n % bs}
        needed |= {t[d // bs] for t, d in zip(tables, done) if d % bs}  # read by this step's completions
        self._release_unneeded(needed)
        tail_mapping: list[int] = []
        completions: list[list[int]] = []
        tail_slots: list[int] = []
        freed: list[int] = []
        row = 0
        for blocks, d, n in zip(tables, done, counts):
            end = d + n
            first = d // bs
            if d % bs and blocks[first] not in self.tail_of:
                self._restore_tail(blocks[first], d % bs)
            for j in range(first, end // bs):  # blocks that fill in this step
                n_tail = d - j * bs if j == first else 0
                tail = self.tail_of[blocks[j]] if n_tail else -1
                completions.append([blocks[j], tail, n_tail, row + max(j * bs - d, 0)])
                if n_tail:
                    freed.append(blocks[j])
            slot = -1
            if end % bs:
                last = blocks[end // bs]
                if last not in self.tail_of:
                    self.tail_of[last] = self._take_tail()
                slot = self.tail_of[last]
            tail_slots.append(slot)
            cut = (end // bs) * bs
            tail_mapping += [slot * bs + p % bs if p >= cut else -1 for p in range(d, end)]
            row += n
        for block in freed:  # after every new slot is taken: no slot is reused within this step
            self._free_tails.append(self.tail_of.pop(block))
        return QuantPlan(
            tail_mapping=torch.tensor(tail_mapping, dtype=torch.int64).to(device),
            completions=torch.tensor(completions, dtype=torch.int32).reshape(-1, 4).to(device),
            tail_slots=torch.tensor(tail_slots, dtype=torch.int32).to(device),
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, plan: QuantPlan | None,
              validate: bool) -> None:  # fmt: skip
        if self.fmt == "int4":
            int4_write_kv(k, v, self.layer(layer), plan.tail_mapping, plan.completions, validate=validate)
        else:
            quant_write_kv(k, v, self.layer(layer), slot_mapping, validate=validate)

    def decode(self, layer: int, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               plan: QuantPlan | None, max_context_len: int, validate: bool) -> torch.Tensor:  # fmt: skip
        return quant_decode_attention(q, self.layer(layer), block_tables, context_lens,
                                      tail_slots=None if plan is None else plan.tail_slots,
                                      max_context_len=max_context_len, validate=validate)  # fmt: skip

    def extend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, query_start_loc: torch.Tensor, plan: QuantPlan | None, max_query_len: int,
               validate: bool) -> torch.Tensor:  # fmt: skip
        return quant_extend_attention(q, self.layer(layer), block_tables, context_lens, query_start_loc, k_new, v_new,
                                      tail_slots=None if plan is None else plan.tail_slots,
                                      max_query_len=max_query_len, validate=validate)  # fmt: skip
