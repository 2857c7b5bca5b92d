"""The quantized-KV ops (lesson 03): check the arguments once, then run Triton or the reference.

* ``quant_write_kv(k, v, kv, slot_mapping)``: int8 / fp8 rows into their slots, quantized on the way.
* ``int4_write_kv(k, v, kv, tail_mapping, completions)``: int4: complete the blocks that fill in this step,
  then store the other rows in full precision in their tail slots.
* ``quant_decode_attention(q, kv, block_tables, context_lens, scale=None, tail_slots=None)``: one query
  per sequence over its quantized paged context.
* ``quant_extend_attention(q, kv, block_tables, context_lens, query_start_loc, k_new, v_new, scale=None,
  tail_slots=None)``: many new tokens per sequence, packed varlen, causal; the prefix from the quantized
  pool, the new tokens from k_new / v_new.

``kv`` is one layer's `QuantizedKV` (its format, data and scales). Which side runs follows lesson 02's
``dispatch`` (``impl="auto" | "triton" | "reference"``, ``set_default_impl``); value checks that read GPU
tensors back run only with ``validate=True``.
"""

from __future__ import annotations

import torch

from . import quant_reference as ref
from .dispatch import (
    _FLOAT_DTYPES,
    Impl,
    _check_device,
    _check_dim,
    _check_int,
    _interpreter_env,
    _want_values,
    resolve_impl,
)
from .quant_reference import FORMATS, QuantizedKV

__all__ = ["int4_write_kv", "quant_decode_attention", "quant_extend_attention", "quant_write_kv"]


def _triton():
    """The Triton side, imported on first use inside ``_interpreter_env`` (so it is built the same way as
    lesson 02's kernels: compiled on a GPU, interpreted on a CPU)."""
    from . import quant_attention, quant_write

    return quant_write, quant_attention


def _check_kv(kv: QuantizedKV) -> None:
    if not isinstance(kv, QuantizedKV):
        raise TypeError(f"kv must be a QuantizedKV (one layer of a quantized pool), got {type(kv).__name__}")
    if kv.fmt not in FORMATS:
        raise ValueError(f"kv.fmt must be one of {FORMATS}, got {kv.fmt!r}")
    devices = {t.device for t in kv.tensors().values()}
    if len(devices) > 1:
        raise ValueError(f"the QuantizedKV's tensors are on several devices: {sorted(map(str, devices))}")
    if kv.fmt == "int4" and (kv.k_zero is None or kv.k_tail is None or kv.v_tail is None):
        raise ValueError("an int4 QuantizedKV needs k_zero, k_tail and v_tail")


def _check_rows(name: str, x: torch.Tensor, kv: QuantizedKV) -> None:
    _check_dim(name, x, 3, "[N, Hkv, D]")
    if x.shape[1:] != (kv.num_heads, kv.head_dim):
        raise ValueError(f"{name} rows are [Hkv, D] = {list(x.shape[1:])} but the pool holds "
                         f"[{kv.num_heads}, {kv.head_dim}]")  # fmt: skip
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def _check_triton_shape(kv: QuantizedKV) -> None:
    if kv.head_dim < 32 or kv.head_dim % 2:
        raise ValueError(f"the quantized Triton kernels need an even head_dim >= 32 (two dots of D/2 >= 16), "
                         f"got {kv.head_dim}; use impl='reference'")  # fmt: skip


def _check_tail_slots(kv: QuantizedKV, tail_slots: torch.Tensor | None, batch: int) -> None:
    if kv.fmt != "int4":
        return
    if tail_slots is None:
        raise ValueError("an int4 pool needs tail_slots [B]: the tail slot of each sequence's unfilled block (-1: none)")
    _check_dim("tail_slots", tail_slots, 1, "[B]")
    _check_int("tail_slots", tail_slots)
    if tail_slots.shape[0] != batch:
        raise ValueError(f"tail_slots has {tail_slots.shape[0]} entries for {batch} sequences")
    _check_device(kv.device, tail_slots=tail_slots)


def _check_attention(q, q_layout, kv, block_tables, context_lens, tail_slots, validate) -> None:
    _check_kv(kv)
    _check_dim("q", q, 3, q_layout)
    _check_dim("block_tables", block_tables, 2, "[B, max_blocks_per_seq]")
    _check_dim("context_lens", context_lens, 1, "[B]")
    _check_int("block_tables", block_tables)
    _check_int("context_lens", context_lens)
    _check_device(kv.device, q=q, block_tables=block_tables, context_lens=context_lens)
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[2] != kv.head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but the pool has {kv.head_dim}")
    if q.shape[1] % kv.num_heads:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({kv.num_heads})")
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"batch sizes disagree: context_lens [{context_lens.shape[0]}], block_tables "
                         f"[{block_tables.shape[0]}, ...]")  # fmt: skip
    _check_tail_slots(kv, tail_slots, context_lens.shape[0])
    if _want_values(validate) and context_lens.numel():
        lens = context_lens.long()
        capacity = block_tables.shape[1] * kv.block_size
        if bool((lens <= 0).any()) or bool((lens > capacity).any()):
            raise ValueError(f"context_lens must be in [1, {capacity}] (block_tables' width x block_size), "
                             f"got {context_lens.tolist()}")  # fmt: skip
        bs = kv.block_size
        full = lens if kv.fmt != "int4" else (lens // bs) * bs
        used = torch.arange(block_tables.shape[1], device=lens.device)[None, :] < ((full + bs - 1) // bs)[:, None]
        ids = block_tables[used]
        if bool(((ids < 0) | (ids >= kv.k.shape[0])).any()):
            raise ValueError(f"block_tables holds a block id outside [0, {kv.k.shape[0]}) in a used entry")
        if kv.fmt == "int4":
            need = (lens % bs) > 0
            bad = need & ((tail_slots.long() < 0) | (tail_slots.long() >= kv.k_tail.shape[0]))
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0, 0])
                raise ValueError(f"sequence {i} has {int(lens[i]) % bs} tokens in its unfilled block but tail_slots[{i}] "
                                 f"= {int(tail_slots[i])} is not a tail slot of the pool")  # fmt: skip


def quant_write_kv(
    k: torch.Tensor, v: torch.Tensor, kv: QuantizedKV, slot_mapping: torch.Tensor, *,
    impl: Impl | None = None, validate: bool = False,
) -> None:  # fmt: skip
    """Quantize new keys and values ``[N, Hkv, D]`` into slots ``slot_mapping [N]`` of an int8 / fp8 pool
    (in place; -1 skips the row)."""
    _check_kv(kv)
    if kv.fmt == "int4":
        raise ValueError("an int4 pool is written with int4_write_kv (blocks are quantized when they fill)")
    _check_rows("k", k, kv)
    _check_rows("v", v, kv)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    _check_dim("slot_mapping", slot_mapping, 1, "[N]")
    _check_int("slot_mapping", slot_mapping)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    _check_device(kv.device, k=k, v=v, slot_mapping=slot_mapping)
    if _want_values(validate) and slot_mapping.numel():
        num_slots = kv.k.shape[0] * kv.block_size
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is outside [-1, {num_slots})")
    if resolve_impl(impl, kv.device) == "triton":
        with _interpreter_env(kv.device):
            _triton()[0].quant_write_kv_triton(k, v, kv, slot_mapping)
    else:
        ref.quant_write_kv_ref(k, v, kv, slot_mapping)


def int4_write_kv(
    k: torch.Tensor, v: torch.Tensor, kv: QuantizedKV, tail_mapping: torch.Tensor, completions: torch.Tensor, *,
    impl: Impl | None = None, validate: bool = False,
) -> None:  # fmt: skip
    """Write new rows ``[N, Hkv, D]`` into an int4 pool (in place).

    ``completions [C, 4]`` int32: per block that fills in this step, (block id, tail slot holding its
    first rows or -1, how many rows are in that slot, index of its first row in k/v); those blocks are
    quantized. ``tail_mapping [N]``: where the other rows go in the tail pool (tail slot * block_size +
    offset; -1 for the rows of completed blocks).
    """
    _check_kv(kv)
    if kv.fmt != "int4":
        raise ValueError(f"int4_write_kv writes an int4 pool; this one is {kv.fmt!r} (use quant_write_kv)")
    _check_rows("k", k, kv)
    _check_rows("v", v, kv)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if k.dtype != kv.k_tail.dtype or v.dtype != kv.v_tail.dtype:
        raise TypeError(f"k/v are {k.dtype}/{v.dtype} but the tail pool holds {kv.k_tail.dtype}: cast them first")
    _check_dim("tail_mapping", tail_mapping, 1, "[N]")
    _check_int("tail_mapping", tail_mapping)
    _check_dim("completions", completions, 2, "[C, 4]")
    if completions.shape[1] != 4 or completions.dtype != torch.int32:
        raise ValueError(f"completions must be int32 [C, 4], got {completions.dtype} {list(completions.shape)}")
    if tail_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"tail_mapping has {tail_mapping.shape[0]} entries for {k.shape[0]} tokens")
    _check_device(kv.device, k=k, v=v, tail_mapping=tail_mapping, completions=completions)
    if _want_values(validate):
        bs, num_tail = kv.block_size, kv.k_tail.shape[0]
        if tail_mapping.numel() and bool(((tail_mapping < -1) | (tail_mapping >= num_tail * bs)).any()):
            raise ValueError(f"tail_mapping holds a slot outside [-1, {num_tail * bs})")
        if completions.numel():
            block, tail, n_tail, row0 = completions.long().unbind(1)
            ok = ((block >= 0) & (block < kv.k.shape[0]) & (n_tail >= 0) & (n_tail <= bs) & (tail < num_tail)
                  & ((n_tail == 0) | (tail >= 0)) & (row0 >= 0) & (row0 + bs - n_tail <= k.shape[0]))  # fmt: skip
            if not bool(ok.all()):
                i = int(torch.nonzero(~ok)[0, 0])
                raise ValueError(f"completions[{i}] = {completions[i].tolist()} does not describe a block of this pool "
                                 "filled from a tail slot and the new rows")  # fmt: skip
    if resolve_impl(impl, kv.device) == "triton":
        _check_triton_shape(kv)
        with _interpreter_env(kv.device):
            _triton()[0].int4_write_kv_triton(k, v, kv, tail_mapping, completions)
    else:
        ref.int4_write_kv_ref(k, v, kv, tail_mapping, completions)


def quant_decode_attention(
    q: torch.Tensor,
    kv: QuantizedKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    tail_slots: torch.Tensor | None = None,
    *,
    impl: Impl | None = None,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """One new query per sequence over its quantized paged context: ``q [B, Hq, D] -> [B, Hq, D]``.

    Conventions of lesson 02's ``paged_decode_attention`` (the query is the last of ``context_lens[b]``
    tokens, already written). int4 pools also take ``tail_slots [B]`` (int32): each sequence's tail slot,
    holding its tokens past the last full block. ``max_context_len`` (a host bound) sizes the split-KV
    count without a GPU sync; ``num_splits`` forces it.
    """
    _check_attention(q, "[B, Hq, D]", kv, block_tables, context_lens, tail_slots, validate)
    if q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"q has {q.shape[0]} sequences but context_lens has {context_lens.shape[0]}")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= 128):
        raise ValueError(f"num_splits must be an int in [1, 128] (or None to choose), got {num_splits!r}")
    if resolve_impl(impl, q.device) == "triton":
        _check_triton_shape(kv)
        with _interpreter_env(q.device):
            return _triton()[1].quant_decode_attention_triton(
                q, kv, block_tables, context_lens, scale, tail_slots, num_splits=num_splits,
                max_context_len=max_context_len,
            )  # fmt: skip
    return ref.quant_decode_attention_ref(q, kv, block_tables, context_lens, scale, tail_slots)


def quant_extend_attention(
    q: torch.Tensor,
    kv: QuantizedKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
    tail_slots: torch.Tensor | None = None,
    *,
    impl: Impl | None = None,
    max_query_len: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Many new tokens per sequence over a quantized paged prefix, packed varlen and causal:
    ``q [total_q, Hq, D] -> [total_q, Hq, D]``.

    Sequence b's queries are rows ``query_start_loc[b]:query_start_loc[b+1]``, the last ``q_len`` of its
    ``context_lens[b]`` tokens. Its first ``context_len - q_len`` tokens (the cached prefix) are read from
    the quantized pool (int4: the ones past its last full block from ``tail_slots``); the new tokens' own
    keys and values from ``k_new, v_new [total_q, Hkv, D]`` in full precision.
    """
    _check_attention(q, "[total_q, Hq, D]", kv, block_tables, context_lens, tail_slots, validate)
    _check_dim("query_start_loc", query_start_loc, 1, "[B + 1]")
    _check_int("query_start_loc", query_start_loc)
    _check_device(kv.device, query_start_loc=query_start_loc, k_new=k_new, v_new=v_new)
    if query_start_loc.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(f"query_start_loc must have B + 1 = {context_lens.shape[0] + 1} entries, "
                         f"got {query_start_loc.shape[0]}")  # fmt: skip
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _check_rows(name, t, kv)
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} rows for {q.shape[0]} queries (packed like q)")
    if _want_values(validate) and context_lens.numel():
        starts = query_start_loc.long()
        q_lens = starts[1:] - starts[:-1]
        if int(starts[0]) != 0 or int(starts[-1]) != q.shape[0] or bool((q_lens < 0).any()):
            raise ValueError(f"query_start_loc must rise from 0 to total_q = {q.shape[0]}, got {query_start_loc.tolist()}")
        if bool((q_lens > context_lens.long()).any()):
            raise ValueError("a sequence has more new tokens than context_lens: context_lens counts the new tokens too")
        if max_query_len is not None and q_lens.numel() and max_query_len < int(q_lens.max()):
            raise ValueError(f"max_query_len = {max_query_len} but a sequence has {int(q_lens.max())} new tokens")
    if resolve_impl(impl, q.device) == "triton":
        _check_triton_shape(kv)
        with _interpreter_env(q.device):
            return _triton()[1].quant_extend_attention_triton(
                q, kv, block_tables, context_lens, query_start_loc, k_new, v_new, scale, tail_slots,
                max_query_len=max_query_len,
            )  # fmt: skip
    return ref.quant_extend_attention_ref(q, kv, block_tables, context_lens, query_start_loc, k_new, v_new, scale,
                                          tail_slots)  # fmt: skip
