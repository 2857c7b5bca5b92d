"""Triton kernels for a paged KV cache: slot writes, split-KV decode attention, and varlen extend attention.

Each kernel has a plain-PyTorch twin in ``reference.py`` with the same signature; ``dispatch.py`` checks
the arguments and picks one side. The launchers here assume checked arguments.

Conventions (vLLM's): ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``, ``block_tables [B, max_blocks]``,
``context_lens [B]``. Any strides work for the tensors whose strides are passed in (views and slices are
fine); ``context_lens`` and ``query_start_loc`` are made contiguous at launch.

Design notes, the "why" of the code below:

* Decode is memory-bound: every K/V byte of the context is read once per step and used for ~2 flops.
  So (1) all ``Hq / Hkv`` query heads that share a KV head are processed by the SAME program, as a
  [GROUP, D] tile against a [BLOCK_N, D] tile of K with ``tl.dot`` (GROUP padded to 16, the smallest
  ``tl.dot`` shape): each KV byte is read once, not once per query head; (2) a tile spans several
  pages, gathered through the block table, so each iteration has enough bytes in flight; (3) the context
  is split across programs (flash-decoding) when ``B * Hkv`` alone cannot fill the GPU: each split writes
  a partial output and its log-sum-exp, and the LAST split of each (sequence, KV head) to finish, found
  with an arrival counter, merges them (``fused_merge``). That merge runs while the GPU idles, so it
  must be one round trip to L2: all GROUP heads and all splits loaded at once (merging one head at a
  time, two trips each, made it 8% slower than a second merge kernel at 1 x 32k on the H200; now it is
  0.5-0.7 us faster). ``fused_merge=False`` is the two-kernel merge, which can start early with
  programmatic dependent launch (``pdl``, Hopper; no gain measured).
* The split's share of the context comes from the caller's ``max_context_len`` when given: then the
  first block-table read does not wait for the context length to arrive (one memory latency less before
  the K/V stream starts, ~1% at 1 x 32k).
* Softmax is online and in float32, in base 2: the scale is multiplied by log2(e) once so the inner loop
  uses ``exp2``; the log-sum-exps passed between the two decode kernels are base 2 too.
* Extend (many new tokens per sequence) is compute-bound: a FlashAttention-2 style kernel over pages,
  split in two loops: the keys every query in the tile sees (no mask work at all), then the few tiles on
  the causal diagonal (or the custom mask) with masking.
* Extend with ``k_new, v_new`` (SGLang's design): the step's new tokens' K/V are also at hand as packed
  contiguous rows (the tensors that were just written into their slots), so only the cached prefix is
  gathered through the block table and the new part is read from those rows. Contiguous rows are what
  Hopper's TMA loads (tensor descriptors) need; a gathered load never gets them. ``ExtendConfig.new_kv``
  picks "tma" (descriptors), "pointer" (ordinary loads of the same rows) or "paged" (ignore k_new).
* Under the interpreter (``TRITON_INTERPRET=1``) ``tl.dot`` on bfloat16 is silently wrong (numpy has no
  bfloat16), so the launchers ask the kernels to upcast dot operands there (``UPCAST``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (Hopper): the merge kernel starts while the split kernel drains
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older triton: DecodeConfig.pdl then has no effect
    gdc_launch_dependents = gdc_wait = None
try:  # the decode timeline diagnostic (TRACE_BUFFER, bench/decode_timeline.py)
    from triton.language.extra.cuda import globaltimer, smid
except ImportError:
    globaltimer = smid = None

LOG2E = 1.4426950408889634
MAX_SPLITS = 128  # the merge kernel holds all splits of one head in registers: [next_pow2(splits), D]
MIN_TOKENS_PER_SPLIT = 512  # below this a split's fixed cost (q load, partial write, merge) dominates


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when these kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(_decode_split_kernel, InterpretedFunction)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run tl.dot in tf32 (10-bit mantissa): exact fp32 costs speed only there.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# 1. Writing new K/V into their slots
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_cache_kernel(
    K, V, KCache, VCache, SlotMapping,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    num_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per new token: copy its [Hkv, D] key and value rows; slot -1 stores nothing."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + token).to(tl.int64)
    safe = tl.maximum(slot, 0)  # keep the address arithmetic in range; the mask does the skipping
    block = safe // BLOCK_SIZE
    offset = safe % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A vector, not a scalar bool: the interpreter cannot broadcast a scalar mask (triton 3.9).
    keep = (tl.zeros([BLOCK_H], tl.int64) + slot) >= 0
    mask = (offs_h[:, None] < num_heads) & keep[:, None] & (offs_d[None, :] < head_dim)
    k = tl.load(K + token * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(V + token * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    kc = KCache + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd
    vc = VCache + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(kc, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VCache.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton twin of ``write_kv_cache_ref``: in place, one program per token."""
    n, num_heads, head_dim = k.shape
    if n == 0:
        return
    _write_kv_cache_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        num_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 2. Decode: one query token per sequence, split-KV (flash-decoding), GQA heads grouped
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes and launch options of the decode kernel (the benchmark sweeps these)."""

    block_n: int = 64  # tokens per iteration: several 16-token pages gathered per tile
    num_warps: int = 4
    num_stages: int = 3
    evict_first: bool = False  # hint L2 to drop K/V first (each byte is read once per step)
    # Split-KV: the last split to arrive merges (False: a second merge kernel). None: fused on the split
    # schedule (1 x 32k on the H200: 0.5-0.7 us less per step, decode_long_h200.json), two kernels on
    # stream-K (where it measured mixed, decode_streamk_h200.json).
    fused_merge: bool | None = None
    # The merge kernel as a programmatic dependent launch (sm_90+, not interpreted): "off"; "end" (the
    # split programs allow it once their partials are stored); "start" (allowed at once: the merge
    # programs are resident and waiting when the last split finishes, at the cost of their SM slots)
    pdl: str = "off"
    # Load the next tile's block ids one iteration ahead: the pipeliner then multi-buffers the gathered K/V
    # (without it, one buffer at any num_stages). None: on exactly when the context is split (decode_plan).
    prefetch_ids: bool | None = None
    # "split": a grid of B x Hkv x splits programs (flash-decoding); "streamk": one wave of
    # programs_per_sm x SMs programs sharing all the tiles evenly (``decode_streamk.py``); "auto": split,
    # unless its grid would end in a wave less than AUTO_WAVE_FILL full (see ``choose_schedule``).
    schedule: str = "auto"
    programs_per_sm: int | None = None  # streamk: None = as many as fit (from the compiled kernel)
    maxnreg: int | None = None  # cap on registers per thread (ptxas): one more program per SM, a few spills


@triton.jit
def _decode_range(
    q, table, k_base, v_base, start, end, ids_end, qk_scale,
    stride_btn, stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVICT: tl.constexpr,
    PREFETCH_IDS: tl.constexpr,
):  # fmt: skip
    """(acc, max, sum): q's GROUP heads [BLOCK_G, BLOCK_D] over tokens [start, end) of one sequence's KV head.

    ``table`` is that sequence's block-table row, ``k_base``/``v_base`` the caches offset to the KV head.
    ``ids_end`` bounds the block-table read of the first tile (PREFETCH_IDS): ``end``, or a bound the
    caller knows without loading the context length, so that this read need not wait for that load.
    Shared by the split kernel and the stream-K kernel (``decode_streamk.py``); inlined into both.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if PREFETCH_IDS:  # the first tile's block ids; each iteration then loads the next tile's
        first = start + tl.arange(0, BLOCK_N)
        next_block = tl.load(table + (first // PAGE_SIZE) * stride_btn, mask=first < ids_end, other=0)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # Gather: token -> (physical block, offset in block) through this sequence's block table.
        if PREFETCH_IDS:
            # Block ids one tile ahead, carried by the loop: the K/V loads' addresses then come from the
            # previous iteration, so the pipeliner gives them num_stages - 1 buffers instead of treating
            # them as indirect loads (one buffer at 3 stages: one tile in flight per program).
            block = next_block.to(tl.int64)
            ahead = offs_n + BLOCK_N
            next_block = tl.load(table + (ahead // PAGE_SIZE) * stride_btn, mask=ahead < end, other=0)
        else:
            block = tl.load(table + (offs_n // PAGE_SIZE) * stride_btn, mask=n_mask, other=0).to(tl.int64)
        in_block = offs_n % PAGE_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_base + block[:, None] * stride_kcb + in_block[:, None] * stride_kct + offs_d[None, :] * stride_kcd,
            mask=kv_mask,
            other=0.0,
            eviction_policy=EVICT,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], base 2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i, False)  # every tile has >= 1 valid token
        v = tl.load(
            v_base + block[:, None] * stride_vcb + in_block[:, None] * stride_vct + offs_d[None, :] * stride_vcd,
            mask=kv_mask,
            other=0.0,
            eviction_policy=EVICT,
        )
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulate in place
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, Out, PartialOut, PartialLse, Counters, Trace,
    qk_scale, num_splits, num_kv_heads, host_pages, table_tokens,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVICT: tl.constexpr,
    FUSED_MERGE: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
    PDL: tl.constexpr,
    PDL_START: tl.constexpr, PREFETCH_IDS: tl.constexpr, HOST_SPLIT: tl.constexpr, TRACE: tl.constexpr = False,
):  # fmt: skip
    """Program (b, kv_head, split): all GROUP query heads of one KV head over one range of the context.

    The range is this split's share of the context: whole pages when the host gives the bound
    (HOST_SPLIT), else rounded up to whole BLOCK_N tiles in the kernel. With one split
    (DIRECT_OUT) the normalised output is written directly; otherwise the partial output (already divided
    by its own softmax sum) and its base-2 log-sum-exp are written for a merge: by the merge kernel, or
    (FUSED_MERGE) by whichever split of this (b, kv_head) finishes last. An empty split writes lse = -inf,
    which the merge weighs as zero.
    """
    if TRACE:
        t_start = globaltimer()
    if PDL_START:  # the merge kernel may launch now; its gdc_wait still waits for this whole grid
        gdc_launch_dependents()
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(ContextLens + b)
    if HOST_SPLIT:
        # Split ranges from the caller's max context, ``host_pages`` pages shared out evenly in whole pages:
        # the range, hence the first block-table read, is known before the context length arrives, so the
        # two loads overlap (one memory latency less before the K/V stream starts); and any split count
        # balances (1 x 32k: 33 splits of 62-63 pages fill both slots of every SM). The last split takes
        # whatever is left, even past that max.
        last = split == num_splits - 1
        start = (split * host_pages // num_splits) * PAGE_SIZE
        stop = ((split + 1) * host_pages // num_splits) * PAGE_SIZE
        end = tl.where(last, context_len, tl.minimum(stop, context_len))
        ids_end = tl.where(last, table_tokens, tl.minimum(stop, table_tokens))
    else:
        split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, context_len)
        ids_end = end

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    table = BlockTables + b.to(tl.int64) * stride_btb
    acc, m_i, l_i = _decode_range(
        q, table, KCache + kv_head * stride_kch, VCache + kv_head * stride_vch, start, end, ids_end, qk_scale,
        stride_btn, stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd,
        HEAD_DIM, PAGE_SIZE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PRECISION, UPCAST, EVICT, PREFETCH_IDS,
    )  # fmt: skip
    if TRACE:
        t_loop = globaltimer()
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT_OUT:
        o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        p_ptrs = PartialOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
        tl.store(p_ptrs, out, mask=out_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)
        if PDL and not PDL_START:
            gdc_launch_dependents()
        if FUSED_MERGE:
            # Every thread's partial stores happen-before the barrier; the release half of the atomic
            # (gpu scope, cumulative) then publishes them all. The split that sees num_splits - 1 is the
            # last: its acquire makes every other split's partials visible to it.
            tl.debug_barrier()
            counter = Counters + b * num_kv_heads + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.debug_barrier()  # the whole program reads after the (one-thread) acquire
                _merge_heads(PartialOut, PartialLse, Out, b, kv_head * GROUP, num_splits,
                             stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
                             GROUP, HEAD_DIM, BLOCK_GM, BLOCK_S, BLOCK_D, CHUNK_S)  # fmt: skip
                tl.store(counter, 0)  # reset for the next launch (stream order makes it visible there)
    if TRACE:  # (start, loop done, end, SM) in ns of %globaltimer, one row per program
        row = Trace + ((b * num_kv_heads + kv_head) * num_splits + split) * 4
        tl.store(row, t_start)
        tl.store(row + 1, t_loop)
        tl.store(row + 2, globaltimer())
        tl.store(row + 3, smid().to(tl.int64))


@triton.jit
def _merge_heads(
    PartialOut, PartialLse, Out, b, head0, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr,
):  # fmt: skip
    """The fused merge: heads [head0, head0 + GROUP) of sequence b at once, CHUNK_S splits at a time.

    Runs in the tail of the last split to finish, where nothing else hides its latency, so it makes one
    round trip to L2, not one per head: every chunk's loads are independent of the others' (an online
    log-sum-exp merge across chunks), and there is no store until the end. Reads bypass L1 (``.cg``): the
    partials were written by other SMs during this launch.
    """
    offs_g = tl.arange(0, BLOCK_GM)
    offs_d = tl.arange(0, BLOCK_D)
    heads = head0 + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    m = tl.full([BLOCK_GM], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_GM], tl.float32)
    acc = tl.zeros([BLOCK_GM, BLOCK_D], tl.float32)
    for c in tl.static_range(BLOCK_S // CHUNK_S):
        offs_s = c * CHUNK_S + tl.arange(0, CHUNK_S)
        gs_mask = g_mask[:, None] & (offs_s[None, :] < num_splits)
        lse = tl.load(PartialLse + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :], mask=gs_mask,
                      other=float("-inf"), cache_modifier=".cg")  # fmt: skip
        parts = tl.load(PartialOut + b * stride_pb + heads[:, None, None] * stride_ph + offs_s[None, :, None] * stride_ps
                        + offs_d[None, None, :], mask=gs_mask[:, :, None] & d_mask[None, None, :], other=0.0,
                        cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a padded head (or empty chunk) sees only -inf
        alpha = tl.exp2(m - m_sub)
        w = tl.exp2(lse - m_sub[:, None])
        total = total * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(parts * w[:, :, None], 1)
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])  # fmt: skip


@triton.jit
def _decode_merge_kernel(
    PartialOut, PartialLse, Out, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (b, head): out = sum_s w_s * partial_s with w_s = 2^(lse_s - lse_total) (the two-kernel merge).

    All splits are loaded at once, the partials BEFORE the log-sum-exps are reduced: in program order
    after them, their load would wait for the max and sum, two memory round trips in a row instead of one
    (1 x 32k on the H200: the merge is ~6% of the step).
    """
    if PDL:  # launched early: wait until the split kernel has finished and its writes are visible
        gdc_wait()
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    parts = tl.load(PartialOut + b * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # fmt: skip
    lse = tl.load(PartialLse + b * stride_lb + head * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: split 0 always holds the first token (context_len >= 1)
    w = tl.exp2(lse - m)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)  # fmt: skip


_COUNTERS: dict[tuple[str, int | None, int], torch.Tensor] = {}


def merge_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 arrival-counter workspace of >= n entries for the fused decode merge.

    Persistent, not ``torch.zeros`` per call: under CUDA-graph capture a per-call zeros would be one more
    captured memset node per step, while the kernel leaves every counter it used back at 0 (the last
    arriver resets it), so one buffer stays valid for every later launch and graph replay. Buffers are
    cached per (device, power-of-two size) and never freed or replaced: a captured graph keeps pointing
    at the buffer it was captured with. If the first call for a size happens during capture, a buffer
    allocated there would belong to the graph's private pool (and its memset would only run at replay),
    so that call gets its own captured ``torch.zeros`` and nothing is cached. Two streams running decode
    concurrently on one device would share counters: don't (one decode stream per device, as here).
    """
    size = max(64, triton.next_power_of_2(n))
    key = (device.type, device.index, size)
    buf = _COUNTERS.get(key)
    if buf is None:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        buf = torch.zeros(size, dtype=torch.int32, device=device)
        if capturing:
            return buf
        _COUNTERS[key] = buf
    return buf


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: a CUDA device of compute capability >= 9 and a triton that has it."""
    if device.type != "cuda" or gdc_wait is None or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 9


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(
    batch: int, num_kv_heads: int, max_context_len: int, sms: int, block_n: int = 64, programs_per_sm: int = 4
) -> int:
    """How many programs share one sequence's context in decode.

    ``B * Hkv`` programs exist without splitting. With at least 2 per SM already there is no split: the
    partial writes and the merge cost more than the last wave's idle SMs (H200, 64 x 4096 with 8 KV
    heads = 512 programs: 101.5% of copy bandwidth unsplit, 99.5% with 2 splits). Below that, aim for
    about ``programs_per_sm`` programs per SM, but never give a split fewer than MIN_TOKENS_PER_SPLIT
    tokens, and cap at MAX_SPLITS. So batch 1 x 32k tokens with 8 KV heads on 132 SMs gets 64 splits of
    512 tokens at 4 per SM, 32 splits of 1024 at 2 per SM (what ``decode_plan`` asks for).
    """
    programs = batch * num_kv_heads
    if programs >= 2 * sms:
        return 1
    wanted = math.ceil(programs_per_sm * sms / max(programs, 1))
    by_length = math.ceil(max_context_len / max(MIN_TOKENS_PER_SPLIT, block_n))
    splits = max(1, min(wanted, by_length, MAX_SPLITS))
    # Whole tiles per split, and no split left empty by the rounding (66 wanted -> 64 x 8 tiles).
    tiles = max(1, math.ceil(max_context_len / block_n))
    return math.ceil(tiles / math.ceil(tiles / splits))


def decode_plan(batch: int, num_kv_heads: int, max_context_len: int, sms: int, cfg: DecodeConfig) -> tuple[int, bool]:
    """(splits, prefetch_ids) for a launch: a split context runs one wave of long, deeply pipelined programs.

    H200, 1 x 32k, 8 KV heads: 64 splits of plain programs 77.1% of copy bandwidth; with the block ids
    prefetched (two K/V tiles in flight per program, 72 KB of shared memory each, so 3 programs fit on an
    SM) 64 splits drop to 66% (512 programs: a second, partial wave) while 32 splits (256 programs, 2
    per SM, one wave) reach 81.3%. Unsplit launches keep the plain kernel: at 64 x 4096 prefetching cost
    occupancy (84-100% vs 101.6%).
    """
    if cfg.prefetch_ids is not None:
        per_sm = 2 if cfg.prefetch_ids else 4
        return choose_num_splits(batch, num_kv_heads, max_context_len, sms, cfg.block_n, per_sm), cfg.prefetch_ids
    splits = choose_num_splits(batch, num_kv_heads, max_context_len, sms, cfg.block_n, programs_per_sm=2)
    return splits, splits > 1


SCHEDULES = ("auto", "split", "streamk")
AUTO_WAVE_FILL = 0.9  # "auto" leaves the split grid when its last wave would be less full than this
MIXED_SPREAD = 1.5  # ... or when the longest context is this many times the mean (between measured points)
_FITS: dict[tuple, int] = {}


def launch_options(cfg: DecodeConfig) -> dict[str, int]:
    """num_warps, num_stages and (when set, on a GPU) maxnreg for a decode launch."""
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg is not None and not interpreting():
        options["maxnreg"] = cfg.maxnreg
    return options


def programs_per_sm(kernel: Any, args: tuple, meta: dict[str, Any], device: torch.device) -> int:
    """How many programs of this compiled variant one SM holds at once, by registers, shared memory and warps.

    Compiles without launching (``warmup``), once per variant. The interpreter has no compiled kernel;
    it runs programs one by one, so the answer there is nominal (4).
    """
    if device.type != "cuda" or not hasattr(kernel, "warmup"):
        return 4
    key = (kernel.__name__, device.index, *sorted(meta.items()))
    if key not in _FITS:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()  # fills n_regs
        _FITS[key] = fits_per_sm(compiled.n_regs, compiled.metadata.shared, meta["num_warps"], device)
    return _FITS[key]


def fits_per_sm(n_regs: int, shared: int, num_warps: int, device: torch.device) -> int:
    """Programs one SM holds at once given a compiled kernel's registers per thread and shared bytes."""
    props = torch.cuda.get_device_properties(device)
    regs_per_warp = math.ceil(max(1, n_regs) * 32 / 256) * 256  # allocated 256 at a time
    by_regs = props.regs_per_multiprocessor // (regs_per_warp * num_warps)
    by_smem = props.shared_memory_per_multiprocessor // (shared + 1024)  # 1 KB reserved per program
    by_warps = props.max_threads_per_multi_processor // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_warps, 32))


def choose_schedule(
    cfg: DecodeConfig,
    batch: int,
    grid: tuple[int, ...],
    kernel: Any,
    args: tuple,
    meta: dict,
    device: torch.device,
    max_context_len: int | None = None,
    mean_context_len: float | None = None,
) -> str:
    """The schedule for this launch, "split" or "streamk"; "auto" picks stream-K when the split grid would idle.

    Two ways it idles, both measured on the H200 (``decode_streamk_h200.json``):
    * a thin last wave: a grid of P programs on S slots (programs per SM x SMs) takes ceil(P / S) waves,
      and when the last is mostly empty the GPU idles through it (68 x 4096: 544 programs on 528 slots,
      73.0% of copy bandwidth; stream-K 95.7%). Grids within one wave, or ending in a wave at least
      AUTO_WAVE_FILL full, keep the split kernel: on them it is faster (64 x 4096: 101.9% vs 95.4%);
    * spread lengths (max > MIXED_SPREAD x mean; the mean only if the caller passes it): a split
      program's work is its sequence's length, so the grid waits for the longest (64 sequences of 1 to
      8191 tokens: split 66.6%, stream-K 90.0%).
    """
    if cfg.schedule == "split" or batch > _streamk.MAX_BATCH or batch == 0:
        return "split"
    if cfg.schedule == "streamk":
        return "streamk"
    if max_context_len is not None and mean_context_len and max_context_len > MIXED_SPREAD * mean_context_len:
        return "streamk"
    programs = math.prod(grid)
    slots = programs_per_sm(kernel, args, meta, device) * num_sms(device)
    if programs <= slots:
        return "split"
    waves = math.ceil(programs / slots)
    return "split" if programs / (waves * slots) >= AUTO_WAVE_FILL else "streamk"


TRACE_BUFFER: torch.Tensor | None = None  # diagnostic: int64 [programs, 4] per split-kernel launch when set
MANY_PROGRAMS_PER_SM = 8  # B x Hkv at least this many per SM: one-warp programs (between measured points)


def default_decode_config(
    dtype: torch.dtype, head_dim: int, device: torch.device, programs: int | None = None
) -> DecodeConfig:
    """A fixed heuristic (autotune does not run under the interpreter, and decode shapes vary per step).

    16-bit K/V: 64-token tiles (four 16-token pages) for D <= 128, 4 warps. With many more (sequence, KV
    head) programs than SMs (``programs`` = B x Hkv, when the caller knows it), one-warp programs over
    32-token tiles instead: the grid then drains in finer steps (H200, 256 x 1024 = 2048 programs:
    +0.2-1.0 points of copy bandwidth in four runs; at 64 x 4096 = 512 programs they lose 18-22). float32 runs
    tl.dot as exact fp32 FMAs, which needs far more registers: 16-token tiles keep it from spilling
    (checked with ptxas for sm_90).
    """
    if device.type != "cuda":
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return DecodeConfig(block_n=16 if head_dim > 64 else 32, num_warps=4, num_stages=2)
    if head_dim <= 128 and programs is not None and programs >= MANY_PROGRAMS_PER_SM * num_sms(device):
        return DecodeConfig(block_n=32, num_warps=1, num_stages=3, schedule="split")  # many waves: no stream-K
    # 3 stages: measured on the H200 equal or better than 2 at all three benchmark shapes
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=3)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    mean_context_len: float | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Triton twin of ``paged_decode_attention_ref``; ``num_splits`` forces the split count (and with it
    the split schedule, whatever ``config.schedule`` says). ``mean_context_len``, when the caller knows
    it, tells the "auto" schedule whether the lengths are spread (``choose_schedule``).

    ``max_context_len`` (an upper bound on ``context_lens``; without it the block table's width is used,
    so nothing has to be read back from the GPU) steers the split heuristic, and when given also fixes
    each split's share of the context on the host (``HOST_SPLIT``). A bound that is too small costs
    speed, not correctness: the last split takes the rest.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_decode_config(q.dtype, head_dim, q.device, batch * num_kv_heads)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"DecodeConfig.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    table_tokens = block_tables.shape[1] * k_cache.shape[1]
    host_split = max_context_len is not None  # a bound the caller vouches for, not just the table's width
    if max_context_len is None:
        max_context_len = table_tokens
    planned, prefetch = decode_plan(batch, num_kv_heads, max_context_len, num_sms(q.device), cfg)
    forced = num_splits is not None
    if num_splits is None:
        num_splits = planned
    elif cfg.prefetch_ids is None:
        prefetch = num_splits > 1
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    direct = num_splits == 1
    fused = cfg.fused_merge is not False and not direct
    if cfg.pdl not in ("off", "end", "start"):
        raise ValueError(f"DecodeConfig.pdl must be 'off', 'end' or 'start', got {cfg.pdl!r}")
    pdl = cfg.pdl != "off" and not (direct or fused) and pdl_available(q.device)
    if direct:  # placeholders, never touched
        partial, lse = out, out
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        partial = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
        p_strides, l_strides = partial.stride()[:3], lse.stride()[:2]
    counters = merge_counters(q.device, batch * num_kv_heads) if fused else context_lens  # else: never read
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(2, triton.next_power_of_2(num_splits))
    args = (
        q, k_cache, v_cache, block_tables, context_lens.contiguous(), out, partial, lse, counters,  # lens as b
        TRACE_BUFFER if TRACE_BUFFER is not None else context_lens,  # else: never written
        scale * LOG2E, num_splits, num_kv_heads,
        math.ceil(max_context_len / k_cache.shape[1]), table_tokens,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        *p_strides, *l_strides,
    )  # fmt: skip
    meta = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        DIRECT_OUT=direct, DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        EVICT="evict_first" if cfg.evict_first else "", FUSED_MERGE=fused, BLOCK_S=block_s, PDL=pdl,
        PDL_START=pdl and cfg.pdl == "start", PREFETCH_IDS=prefetch,
        HOST_SPLIT=host_split and not direct, TRACE=TRACE_BUFFER is not None,
        BLOCK_GM=triton.next_power_of_2(group),
        # 128 fp32 per thread: a chunk of [BLOCK_GM, CHUNK_S, BLOCK_D] partials spread over the program's threads
        CHUNK_S=min(block_s, max(2, 128 * 32 * cfg.num_warps // (block_d * triton.next_power_of_2(group)))),
        **launch_options(cfg),
    )  # fmt: skip
    grid = (batch, num_kv_heads, num_splits)
    schedule = "split" if forced else choose_schedule(cfg, batch, grid, _decode_split_kernel, args, meta, q.device,
                                                      max_context_len, mean_context_len)  # fmt: skip
    if schedule == "streamk":
        return _streamk.paged_decode_attention_streamk(q, k_cache, v_cache, block_tables, context_lens, scale, config=cfg)
    _decode_split_kernel[grid](*args, **meta)
    if not direct and not fused:
        _decode_merge_kernel[(batch, num_heads)](
            partial, lse, out, num_splits,
            *p_strides, *l_strides, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_D=block_d, PDL=pdl,
            num_warps=4 if block_s * block_d <= 4096 else 8, **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. Extend / prefill: many new tokens per sequence, packed varlen, causal or custom (tree) mask
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtendConfig:
    """Tile sizes and launch options of the extend kernel (the benchmark sweeps these)."""

    block_m: int = 128  # query tokens per program
    block_n: int = 64  # keys per iteration (several pages)
    num_warps: int = 8
    num_stages: int = 3
    # With k_new/v_new: "tma" (tensor descriptors for Q and the new K/V; falls back to "pointer" where they
    # cannot apply), "pointer" (the same contiguous rows, ordinary loads), "paged" (ignore k_new: all
    # keys gathered from the pages, the kernel without k_new)
    new_kv: str = "tma"


NEW_KV_MODES = ("tma", "pointer", "paged")


@triton.jit
def _online_softmax(s, m_i, l_i, GUARD: tl.constexpr):
    """One tile of base-2 online softmax: (p, alpha, new sum, new max), alpha rescaling what was summed
    before. GUARD: a row that has seen no visible key yet (max -inf) keeps max 0, avoiding inf - inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if GUARD:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _extend_tile(
    acc, l_i, m_i, q, k_base, v_base, table, offs_m, n0,
    context_len, prefix, q_row0, Mask,
    stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
    stride_mq, stride_mk, qk_scale,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] step of online softmax. MASKED=False is the fast path: every key is visible."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if MASKED:
        n_mask = offs_n < context_len
        block = tl.load(table + (offs_n // PAGE_SIZE) * stride_btn, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        block = tl.load(table + (offs_n // PAGE_SIZE) * stride_btn).to(tl.int64)
        kv_mask = d_mask[None, :]
    in_block = offs_n % PAGE_SIZE
    k = tl.load(
        k_base + block[:, None] * stride_kcb + in_block[:, None] * stride_kct + offs_d[None, :] * stride_kcd,
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        pos_q = prefix + offs_m  # position of each query in its sequence
        if HAS_MASK:
            new_j = offs_n - prefix  # index of the key among the new tokens (negative: cached)
            allowed = tl.load(
                Mask + (q_row0 + offs_m)[:, None] * stride_mq + new_j[None, :] * stride_mk,
                mask=(new_j[None, :] >= 0) & n_mask[None, :] & (pos_q[:, None] < context_len),
                other=0,
            )
            visible = ((allowed != 0) | (new_j[None, :] < 0)) & n_mask[None, :]
        else:
            visible = (offs_n[None, :] <= pos_q[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i, MASKED)
    v = tl.load(
        v_base + block[:, None] * stride_vcb + in_block[:, None] * stride_vct + offs_d[None, :] * stride_vcd,
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulate in place
    return acc, l_i, m_new


@triton.jit
def _extend_new_tile(
    acc, l_i, m_i, q, KNew, VNew, offs_m, j0, q_len, q_row0, kv_head, Mask,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, stride_mq, stride_mk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``_extend_tile`` for keys j0..j0+BLOCK_N-1 among the new tokens, read from contiguous rows.

    With USE_TMA, KNew/VNew are tensor descriptors over [total_tokens, Hkv * D]: one [BLOCK_N, D] box at
    row q_row0 + j0, column kv_head * D. A box may run into the next sequence's rows (or past the end,
    zero-filled): only MASKED tiles do, and there those keys are masked out and their V rows zeroed.
    """
    offs_j = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    j_mask = offs_j < q_len
    rows = (q_row0 + offs_j).to(tl.int64)
    if MASKED:
        kv_mask = j_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    if USE_TMA:
        k = KNew.load([q_row0 + j0, kv_head * HEAD_DIM])
    else:
        k = tl.load(KNew + rows[:, None] * stride_knt + kv_head * stride_knh + offs_d[None, :] * stride_knd,
                    mask=kv_mask, other=0.0)  # fmt: skip
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        if HAS_MASK:
            allowed = tl.load(
                Mask + (q_row0 + offs_m)[:, None] * stride_mq + offs_j[None, :] * stride_mk,
                mask=j_mask[None, :] & (offs_m[:, None] < q_len),
                other=0,
            )
            visible = (allowed != 0) & j_mask[None, :]
        else:
            visible = (offs_j[None, :] <= offs_m[:, None]) & j_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i, MASKED)
    if USE_TMA:
        v = VNew.load([q_row0 + j0, kv_head * HEAD_DIM])
        if MASKED:
            v = tl.where(j_mask[:, None], v, 0.0)  # another sequence's rows: p is 0 there, keep 0 * v finite
    else:
        v = tl.load(VNew + rows[:, None] * stride_vnt + kv_head * stride_vnh + offs_d[None, :] * stride_vnd,
                    mask=kv_mask, other=0.0)  # fmt: skip
    if UPCAST:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _extend_kernel(
    Q, QDesc, KCache, VCache, KNew, VNew, BlockTables, ContextLens, QueryStartLoc, Out, Mask,
    qk_scale, num_m_blocks,
    stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_knt, stride_knh, stride_knd,
    stride_vnt, stride_vnh, stride_vnd,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    stride_mq, stride_mk,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, NEW_KV: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (head, sequence, query tile). The query tile is the slowest grid axis and runs last-first:
    the tiles that see the most keys start earliest (evening out the tail of a causal launch), and the
    query heads sharing a KV head run side by side, so their K/V reads hit L2.

    Without NEW_KV every key comes from the pages: keys [0, full_end) are visible to every query of the
    tile (they precede its first query, or are cached tokens under a custom mask): loop 1, no masking;
    keys [full_end, kv_end) need the causal or custom mask: loop 2, usually one or two tiles.
    With NEW_KV (KNew/VNew hold the new tokens' K/V as contiguous rows) keys come in two parts, each split
    the same way: the cached prefix [0, prefix) from the pages (whole tiles unmasked, then the one partial
    tile masked to the prefix), then the new tokens [0, q_len) from their rows (the tiles before this
    query tile unmasked, the diagonal ones masked; all masked under a custom mask). With USE_TMA, Q and
    the new rows are tensor descriptors (QDesc, KNew, VNew); output stores stay masked pointer stores,
    so a tile never writes into the next sequence's rows.
    """
    head = tl.program_id(0)
    b = tl.program_id(1)
    m_block = num_m_blocks - 1 - tl.program_id(2)
    q_row0 = tl.load(QueryStartLoc + b)
    q_len = tl.load(QueryStartLoc + b + 1) - q_row0
    m_start = m_block * BLOCK_M
    if m_start >= q_len:
        return
    context_len = tl.load(ContextLens + b)
    prefix = context_len - q_len
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_row0 + offs_m).to(tl.int64)
    if USE_TMA:
        q = QDesc.load([q_row0 + m_start, head * HEAD_DIM])  # rows past q_len: computed, never stored
    else:
        q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_btb
    k_base = KCache + kv_head * stride_kch
    v_base = VCache + kv_head * stride_vch
    if not NEW_KV:
        if HAS_MASK:
            unmasked_end = prefix
            kv_end = context_len
        else:
            unmasked_end = prefix + m_start
            kv_end = tl.minimum(context_len, prefix + m_start + BLOCK_M)
        full_end = (unmasked_end // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _extend_tile(
                acc, l_i, m_i, q, k_base, v_base, table, offs_m, n0,
                context_len, prefix, q_row0, Mask,
                stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
                stride_mq, stride_mk, qk_scale,
                HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, False, HAS_MASK, DOT_PRECISION, UPCAST,
            )  # fmt: skip
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, l_i, m_i = _extend_tile(
                acc, l_i, m_i, q, k_base, v_base, table, offs_m, n0,
                context_len, prefix, q_row0, Mask,
                stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
                stride_mq, stride_mk, qk_scale,
                HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, True, HAS_MASK, DOT_PRECISION, UPCAST,
            )  # fmt: skip
    else:
        acc, l_i, m_i = _extend_prefix_then_new(
            acc, l_i, m_i, q, k_base, v_base, table, KNew, VNew, offs_m, m_start, prefix, q_len, q_row0,
            kv_head, Mask,
            stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
            stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, stride_mq, stride_mk, qk_scale,
            HEAD_DIM, PAGE_SIZE, BLOCK_M, BLOCK_D, BLOCK_N, HAS_MASK, USE_TMA, DOT_PRECISION, UPCAST,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _extend_prefix_then_new(
    acc, l_i, m_i, q, k_base, v_base, table, KNew, VNew, offs_m, m_start, prefix, q_len, q_row0, kv_head, Mask,
    stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
    stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, stride_mq, stride_mk, qk_scale,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """The NEW_KV key loops of ``_extend_kernel``: the cached prefix from the pages, then the new rows."""
    # 1. the cached prefix, gathered through the block table (visible to every query of the tile)
    full_end = (prefix // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _extend_tile(
            acc, l_i, m_i, q, k_base, v_base, table, offs_m, n0,
            prefix, prefix, q_row0, Mask,
            stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
            stride_mq, stride_mk, qk_scale,
            HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, False, False, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    for n0 in range(full_end, prefix, BLOCK_N):  # at most one tile: keys n < prefix, all visible
        acc, l_i, m_i = _extend_tile(
            acc, l_i, m_i, q, k_base, v_base, table, offs_m, n0,
            prefix, prefix, q_row0, Mask,
            stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd, stride_btn,
            stride_mq, stride_mk, qk_scale,
            HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, True, False, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    # 2. the new tokens, contiguous rows
    if HAS_MASK:
        new_full = 0
        new_end = q_len
    else:
        new_full = (m_start // BLOCK_N) * BLOCK_N
        new_end = tl.minimum(q_len, m_start + BLOCK_M)
    for j0 in range(0, new_full, BLOCK_N):
        acc, l_i, m_i = _extend_new_tile(
            acc, l_i, m_i, q, KNew, VNew, offs_m, j0, q_len, q_row0, kv_head, Mask,
            stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, stride_mq, stride_mk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_MASK, USE_TMA, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    for j0 in range(new_full, new_end, BLOCK_N):
        acc, l_i, m_i = _extend_new_tile(
            acc, l_i, m_i, q, KNew, VNew, offs_m, j0, q_len, q_row0, kv_head, Mask,
            stride_knt, stride_knh, stride_knd, stride_vnt, stride_vnh, stride_vnd, stride_mq, stride_mk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_MASK, USE_TMA, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    return acc, l_i, m_i


@functools.lru_cache(maxsize=None)
def _tensor_descriptor_class() -> type | None:
    """Triton's host-side TensorDescriptor (triton >= 3.4), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def tma_available(device: torch.device) -> bool:
    """Whether tensor-descriptor loads can run here: Hopper or newer, or the interpreter (which emulates
    them, triton >= 3.4), and a triton that has host-side descriptors."""
    if _tensor_descriptor_class() is None:
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available():  # compile_check picks GPU configs on a machine without one
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index)[0] >= 9
    return interpreting()


def default_extend_config(
    dtype: torch.dtype, head_dim: int, device: torch.device, has_mask: bool = False, new_kv: bool = False
) -> ExtendConfig:
    """Fixed tiles: FlashAttention-2's usual choice on Hopper for 16-bit D <= 128; smaller tiles where
    registers would spill (float32's exact dot, the custom-mask path, D > 128; checked with ptxas, sm_90).

    With k_new/v_new the new tokens are read through tensor descriptors (TMA) on Hopper, else with
    ordinary loads; the CPU interpreter takes the pointer version (the tests run the descriptor one
    explicitly, where the installed triton can interpret it).
    """
    if device.type != "cuda":
        return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, new_kv="pointer")
    mode = "tma" if tma_available(device) else "pointer"
    if dtype == torch.float32:  # descriptors for fp32 spill badly here (ptxas, sm_90): pointer loads
        return ExtendConfig(block_m=32, block_n=16, num_warps=8, num_stages=2, new_kv="pointer")
    if has_mask:
        return ExtendConfig(block_m=64, block_n=64, num_warps=8, num_stages=2, new_kv=mode)
    if head_dim > 128:
        return ExtendConfig(block_m=64, block_n=32, num_warps=8, num_stages=2, new_kv=mode)
    if new_kv:  # k_new given: 128 x 128 tiles, 8 warps, 3 stages, with TMA: 349 TFLOP/s on the H200 at
        # 8 x 2048 causal (triton 3.6), level with the best of the sweep (128 x 64, 4 warps, 2 stages: 350)
        return ExtendConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, new_kv=mode)
    # 128 x 128 tiles: the best of the benchmark's sweep on the H200 (8 x 2048 causal, bf16, D 128)
    return ExtendConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, new_kv=mode)


def _descriptor(t: torch.Tensor, block_rows: int, head_dim: int):
    """A TMA descriptor over ``t [tokens, H, D]`` seen as [tokens, H * D], box [block_rows, D]; None when
    the layout does not allow one (rows not H * D contiguous values, or 16-byte alignment)."""
    cls = _tensor_descriptor_class()
    elem = t.element_size()
    ok = (
        cls is not None
        and t.shape[0] > 0
        and t.stride(2) == 1
        and t.stride(1) == head_dim
        and head_dim == triton.next_power_of_2(head_dim)
        and head_dim * elem >= 16
        and (t.stride(0) * elem) % 16 == 0
        and t.data_ptr() % 16 == 0
    )
    if not ok:
        return None
    return cls(t, [t.shape[0], t.shape[1] * head_dim], [t.stride(0), 1], [block_rows, head_dim])


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
    custom_mask: torch.Tensor | None = None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    max_query_len: int | None = None,
    config: ExtendConfig | None = None,
) -> torch.Tensor:
    """Triton twin of ``paged_prefill_attention_ref``.

    ``max_query_len`` sizes the grid; without it it is read from ``query_start_loc`` (one GPU sync).
    ``k_new, v_new [total_q, Hkv, D]``: the new tokens' K/V as packed rows (see ``config.new_kv``).
    """
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    batch = context_lens.shape[0]
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_extend_config(q.dtype, head_dim, q.device, custom_mask is not None, k_new is not None)
    out = torch.empty_like(q)
    if total_q == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return out
    num_m_blocks = triton.cdiv(max_query_len, cfg.block_m)
    if custom_mask is None:
        mask, mask_strides = q, (0, 0)  # placeholder, never read (HAS_MASK=False)
    else:
        mask = custom_mask.to(torch.int8)
        mask_strides = mask.stride()
    if cfg.new_kv not in NEW_KV_MODES:
        raise ValueError(f"ExtendConfig.new_kv must be one of {NEW_KV_MODES}, got {cfg.new_kv!r}")
    new_kv = k_new is not None and cfg.new_kv != "paged"
    descs = None
    if new_kv and cfg.new_kv == "tma" and tma_available(q.device):
        descs = (_descriptor(q, cfg.block_m, head_dim), _descriptor(k_new, cfg.block_n, head_dim),
                 _descriptor(v_new, cfg.block_n, head_dim))  # fmt: skip
        if any(d is None for d in descs):  # a layout no descriptor can describe: pointer loads instead
            descs = None
    if not new_kv:  # placeholders, never read (NEW_KV=False)
        k_new, v_new = q[:, :num_kv_heads], q[:, :num_kv_heads]
    q_desc, k_arg, v_arg = (None, k_new, v_new) if descs is None else descs
    _extend_kernel[(num_heads, batch, num_m_blocks)](
        q, q_desc, k_cache, v_cache, k_arg, v_arg, block_tables, context_lens.contiguous(),
        query_start_loc.contiguous(), out, mask,
        scale * LOG2E, num_m_blocks,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        *block_tables.stride(), *out.stride(), *mask_strides,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=cfg.block_m, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=cfg.block_n,
        HAS_MASK=custom_mask is not None, NEW_KV=new_kv, USE_TMA=descs is not None,
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# The stream-K decode builds on the kernels above; imported here, at the end, so that both modules are always
# built in the same mode (compiled, or interpreted when TRITON_INTERPRET=1 was set at import).
from . import decode_streamk as _streamk  # noqa: E402
