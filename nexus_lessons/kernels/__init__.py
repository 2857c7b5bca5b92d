"""Paged-attention kernels (lesson 02): every Triton kernel beside its plain-PyTorch reference.

Layout: ``reference.py`` (the PyTorch twins), ``write.py`` (slot writes), ``decode.py`` (split-KV decode),
``decode_streamk.py`` (the stream-K schedule and the decode launcher), ``extend.py`` (varlen prefill),
``common.py`` (what they share), ``dispatch.py`` (argument checks, then Triton or the reference).
``gemv.py`` and ``rope.py`` are the batch-1 decoder's kernels (``cuda_graph.py``).

Public ops (each checks its arguments, then runs Triton or the reference, see ``dispatch``):

* ``write_kv_cache(k, v, k_cache, v_cache, slot_mapping)``: new K/V rows into their cache slots.
* ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None)``: one query
  token per sequence (split-KV flash-decoding, GQA heads grouped).
* ``paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale=None,
  custom_mask=None)``: many new tokens per sequence, packed varlen, causal or tree-masked.

Quantized KV pools (lesson 03, ``quant.py``; formats and references in ``quant_reference.py``):
``quant_write_kv``, ``int4_write_kv``, ``quant_decode_attention``, ``quant_extend_attention`` over a
``QuantizedKV`` (one layer's int8 / fp8 / int4 blocks and their scales), dequantizing in registers.

The references (``*_ref``) take the same arguments. Triton itself is imported only when a kernel first
runs, so ``TRITON_INTERPRET=1`` can still be set after ``import nexus_lessons`` on a CPU machine, as long
as nothing imported triton before.
"""

from .dispatch import (
    Impl,
    get_default_impl,
    interpreter_active,
    paged_decode_attention,
    paged_prefill_attention,
    resolve_impl,
    set_default_impl,
    write_kv_cache,
)
from .quant import int4_write_kv, quant_decode_attention, quant_extend_attention, quant_write_kv
from .quant_reference import QuantizedKV
from .reference import (
    gather_kv,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prefill_visibility,
    write_kv_cache_ref,
)

__all__ = [
    "Impl",
    "QuantizedKV",
    "gather_kv",
    "get_default_impl",
    "int4_write_kv",
    "interpreter_active",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "prefill_visibility",
    "quant_decode_attention",
    "quant_extend_attention",
    "quant_write_kv",
    "resolve_impl",
    "set_default_impl",
    "write_kv_cache",
    "write_kv_cache_ref",
]
