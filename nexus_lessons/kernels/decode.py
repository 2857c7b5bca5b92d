"""Split-KV decode attention over a paged KV cache (flash-decoding), all query heads of a KV head together.

One query token per sequence, ``q [B, Hq, D]``; the cache is ``[num_blocks, block_size, Hkv, D]`` and
``block_tables [B, max_blocks]`` maps each sequence's token t to block ``block_tables[b, t // block_size]``.
The PyTorch twin is ``reference.paged_decode_attention_ref``; ``decode_streamk.py`` adds a second
schedule for grids that would leave the GPU idle and holds the launcher that picks between the two.

Why the kernel looks like this:

* Decode is memory-bound: every K/V byte of the context is read once per step and used for ~2 flops.
  So (1) all ``Hq / Hkv`` query heads that share a KV head are one program's [GROUP, D] tile against a
  [BLOCK_N, D] tile of K (``tl.dot``; GROUP padded to 16, its smallest shape): each KV byte is read
  once, not once per query head; (2) a tile spans several pages, gathered through the block table, so
  each iteration has enough bytes in flight.
* When ``B * Hkv`` programs cannot fill the GPU the context is split across programs: each split writes
  a partial output and its log-sum-exp, and the LAST split of each (sequence, KV head) to finish, found
  with an arrival counter, merges them. The merge runs while the GPU idles, so it makes one round trip
  to L2: all GROUP heads and all splits loaded at once (0.5-0.7 us faster than a second merge kernel at
  1 x 32k on the H200).
* A split program loads the next tile's block ids one iteration ahead, so the compiler multi-buffers
  the gathered K/V (two tiles in flight per program). That needs more shared memory, so split launches
  aim at one wave of 2 programs per SM (H200, 1 x 32k: 32 such splits 81.3% of copy bandwidth, 64 plain
  ones 77.1%). Unsplit launches keep the plain loop (at 64 x 4096 prefetching cost occupancy).
* With the caller's ``max_context_len`` each split's range is fixed on the host, in whole pages, so its
  first block-table read need not wait for the context length to arrive (~1% at 1 x 32k).
* Softmax is online, in float32 and base 2: the scale is multiplied by log2(e) once so the loop uses
  ``exp2``; the log-sum-exps passed to the merge are base 2 too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision, num_sms, upcast
from .launch import launch

MAX_SPLITS = 128  # the merge holds all splits of a head group in registers
MIN_TOKENS_PER_SPLIT = 512  # below this a split's fixed cost (q load, partial write, merge) dominates
SPLIT_PROGRAMS_PER_SM = 2  # a split program (block ids prefetched) is sized for 2 per SM: one wave
MANY_PROGRAMS_PER_SM = 8  # B x Hkv at least this many per SM: one-warp programs over 32-token tiles
STREAMK_MAX_BATCH = 4096  # every stream-K program holds the batch's layout in registers
AUTO_WAVE_FILL = 0.9  # "auto" leaves the split grid when its last wave would be less full than this
MIXED_SPREAD = 1.5  # ... or when the longest context is this many times the mean


@dataclass(frozen=True)
class DecodeConfig:
    """Tile and launch options of the decode kernels (the benchmark and the compile check pass their own)."""

    block_n: int = 64  # tokens per iteration: several 16-token pages gathered per tile
    num_warps: int = 4
    num_stages: int = 3
    streamk: bool = True  # whether the launcher may pick the stream-K schedule for this grid


def default_decode_config(
    dtype: torch.dtype, head_dim: int, device: torch.device, programs: int | None = None
) -> DecodeConfig:
    """A fixed heuristic (autotune does not run under the interpreter, and decode shapes vary per step).

    16-bit K/V: 64-token tiles (four 16-token pages) for D <= 128, 4 warps, 3 stages. With many more
    (sequence, KV head) programs than SMs (``programs`` = B x Hkv), one-warp programs over 32-token
    tiles: the grid drains in finer steps (H200, 256 x 1024 = 2048 programs: +0.2-1.0 points of copy
    bandwidth; at 64 x 4096 = 512 programs they lose 18-22). float32 runs ``tl.dot`` as exact fp32
    FMAs, which needs far more registers: 16-token tiles keep it from spilling (ptxas, sm_90).
    """
    many = device.type == "cuda" and programs is not None and programs >= MANY_PROGRAMS_PER_SM * num_sms(device)
    return _config(dtype, head_dim, device.type == "cuda", many)


@functools.lru_cache(maxsize=None)
def _config(dtype: torch.dtype, head_dim: int, cuda: bool, many: bool) -> DecodeConfig:
    if not cuda:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return DecodeConfig(block_n=16 if head_dim > 64 else 32, num_warps=4, num_stages=2)
    if many and head_dim <= 128:
        return DecodeConfig(block_n=32, num_warps=1, num_stages=3, streamk=False)  # many waves already
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------------------


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
def _decode_range(
    q, table, k_base, v_base, start, end, ids_end, qk_scale,
    stride_btn, stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PREFETCH_IDS: tl.constexpr,
):  # fmt: skip
    """(acc, max, sum): q's GROUP heads [BLOCK_G, BLOCK_D] over tokens [start, end) of one sequence's KV head.

    ``table`` is that sequence's block-table row, ``k_base``/``v_base`` the caches offset to the KV head.
    ``ids_end`` bounds the first tile's block-table read (PREFETCH_IDS): ``end``, or a bound known
    without loading the context length, so that this read need not wait for that load.
    Shared by the split kernel and the stream-K kernel; inlined into both.
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
            # them as indirect loads (one buffer: one tile in flight per program).
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
        )
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulate in place
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _merge_heads(
    PartialOut, PartialLse, Out, b, head0, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr,
):  # fmt: skip
    """Heads [head0, head0 + GROUP) of sequence b: out = sum_s 2^(lse_s - lse) * partial_s, CHUNK_S splits
    at a time.

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


# host_pages and table_tokens only bound the split ranges; not specialized (== 1, % 16), a caller's bound
# that crosses a multiple of 16 reuses the compiled kernel
@triton.jit(do_not_specialize=["host_pages", "table_tokens"])
def _decode_split_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, Out, PartialOut, PartialLse, Counters,
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
    DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
    PREFETCH_IDS: tl.constexpr, HOST_SPLIT: tl.constexpr,
):  # fmt: skip
    """Program (b, kv_head, split): all GROUP query heads of one KV head over one range of the context.

    The range is this split's share of the context: whole pages when the host gives the bound
    (HOST_SPLIT), else whole BLOCK_N tiles of the real length. With one split (DIRECT_OUT) the normalised
    output is written directly; otherwise the partial output (already divided by its own softmax sum) and
    its base-2 log-sum-exp, and whichever split of this (b, kv_head) arrives last merges them. An empty
    split writes lse = -inf, which the merge weighs as zero.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(ContextLens + b)
    if HOST_SPLIT:
        # ``host_pages`` pages shared out evenly in whole pages: the range, hence the first block-table
        # read, is known before the context length arrives, so the two loads overlap; any split count
        # balances. The last split takes whatever is left, even past the caller's bound.
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
        HEAD_DIM, PAGE_SIZE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PRECISION, UPCAST, PREFETCH_IDS,
    )  # fmt: skip
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
        # Every thread's partial stores happen-before the barrier; the release half of the atomic (gpu
        # scope, cumulative) then publishes them all. The split that sees num_splits - 1 is the last: its
        # acquire makes every other split's partials visible to it.
        tl.debug_barrier()
        counter = Counters + b * num_kv_heads + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.debug_barrier()  # the whole program reads after the (one-thread) acquire
            _merge_heads(PartialOut, PartialLse, Out, b, kv_head * GROUP, num_splits,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
                         GROUP, HEAD_DIM, BLOCK_GM, BLOCK_S, BLOCK_D, CHUNK_S)  # fmt: skip
            tl.store(counter, 0)  # reset for the next launch (stream order makes it visible there)


# ----------------------------------------------------------------------------------------------------------
# planning: split count, schedule, workspace
# ----------------------------------------------------------------------------------------------------------


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context_len: int,
    sms: int,
    block_n: int = 64,
    programs_per_sm: int = SPLIT_PROGRAMS_PER_SM,
) -> int:
    """How many programs share one sequence's context.

    ``B * Hkv`` programs exist without splitting. With at least 2 per SM already there is no split: the
    partial writes and the merge cost more than the last wave's idle SMs (H200, 64 x 4096 with 8 KV
    heads = 512 programs: 101.5% of copy bandwidth unsplit, 99.5% with 2 splits). Below that, fill one
    wave of ``programs_per_sm`` programs per SM and no more (a grid within one wave is where the split
    kernel is at its best, see ``choose_schedule``), but never give a split fewer than
    MIN_TOKENS_PER_SPLIT tokens, and cap at MAX_SPLITS. Batch 1 x 32k with 8 KV heads on 132 SMs: 32
    splits of 1024 tokens; 16 x 4096: 2 splits (256 programs on 264 slots).
    """
    programs = batch * num_kv_heads
    if programs >= 2 * sms:
        return 1
    wanted = max(1, programs_per_sm * sms // max(programs, 1))
    by_length = math.ceil(max_context_len / max(MIN_TOKENS_PER_SPLIT, block_n))
    splits = max(1, min(wanted, by_length, MAX_SPLITS))
    # Whole tiles per split, and no split left empty by the rounding (33 wanted -> 32 x 16 tiles).
    tiles = max(1, math.ceil(max_context_len / block_n))
    return math.ceil(tiles / math.ceil(tiles / splits))


def choose_schedule(batch: int, programs: int, slots: int, spread: bool = False) -> str:
    """"split" or "streamk" for a split grid of ``programs`` on ``slots`` (programs per SM x SMs).

    The split grid idles in two ways, both measured on the H200 (``decode_streamk.py`` has the figures):
    * a thin last wave: ceil(programs / slots) waves, the last mostly empty (68 x 4096: 544 programs on
      528 slots, 73.0% of copy bandwidth; stream-K 95.7%). Grids within one wave, or ending in a wave at
      least AUTO_WAVE_FILL full, keep the split kernel, which is faster there (64 x 4096: 101.9% vs 95.4%);
    * ``spread`` lengths (the caller's max > MIXED_SPREAD x its mean): a split program's work is its
      sequence's length, so the grid waits for the longest (64 sequences of 1 to 8191 tokens: split
      66.6%, stream-K 90.0%).
    """
    if batch == 0 or batch > STREAMK_MAX_BATCH:
        return "split"
    if spread:
        return "streamk"
    if programs <= slots:
        return "split"
    waves = math.ceil(programs / slots)
    return "split" if programs / (waves * slots) >= AUTO_WAVE_FILL else "streamk"


_FITS: dict[tuple, int] = {}


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


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def workspace(
    name: str, device: torch.device, n: int, dtype: torch.dtype, zero: bool = False
) -> torch.Tensor:
    """A flat buffer of >= n elements, kept per (name, device, power-of-two size) and never freed.

    Persistent, not allocated per call: a launch then costs no allocator call, and a CUDA graph keeps
    pointing at the buffer it was captured with, which stays valid for every later launch and replay.
    If the first request for a size comes during CUDA-graph capture, a buffer allocated there would
    belong to the graph's private pool (and a zeroing memset would only run at replay), so that call gets
    its own tensor (captured) and nothing is cached. Two streams launching concurrently on one device
    would share buffers: don't (one decode stream per device).
    """
    size = max(64, 1 << (n - 1).bit_length())  # triton.next_power_of_2 is a constexpr_function: ~2 us a call
    key = (name, device.type, device.index, size)
    buf = _WORKSPACES.get(key)
    if buf is None:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        buf = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=device)
        if capturing:
            return buf
        _WORKSPACES[key] = buf
    return buf


def merge_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 arrival-counter workspace of >= n entries for the merge.

    A ``workspace``: a per-call ``torch.zeros`` would be one more memset per step (captured too), while
    the kernel leaves every counter it used back at 0 (the last arriver resets it), so one buffer stays
    valid for every later launch and graph replay.
    """
    return workspace("merge_counters", device, n, torch.int32, zero=True)


class DecodePlan(NamedTuple):
    """What a launch of this shape needs, worked out once and cached (``plan_decode``)."""

    config: DecodeConfig
    splits: int
    schedule: str  # "split" or "streamk"
    host_split: bool
    meta: dict[str, Any]  # the split kernel's constexprs and launch options
    key: tuple  # plan_decode's cache key: hashable where ``meta`` is not, and it determines ``meta``


_PLANS: dict[tuple, DecodePlan] = {}


def plan_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_splits: int | None,
    max_context_len: int | None,
    mean_context_len: float | None,
    config: DecodeConfig | None,
) -> DecodePlan:
    """The launch plan, from what the host already knows (shapes, dtypes, the caller's bounds).

    Without ``max_context_len`` the block table's width bounds the lengths. The split count depends on
    that bound only through its number of tiles (of 16, 32 or 64 tokens), so the cache key holds the
    bound in 16-token units: a context that grows by one token per step reuses the plan for 16 steps.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    bound = block_tables.shape[1] * page if max_context_len is None else max_context_len
    spread = bool(mean_context_len) and max_context_len is not None and max_context_len > MIXED_SPREAD * mean_context_len
    key = (q.dtype, q.device, batch, num_heads, head_dim, num_kv_heads, page, -(-bound // 16),
           max_context_len is not None, spread, num_splits, config)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        cfg = config or default_decode_config(q.dtype, head_dim, q.device, batch * num_kv_heads)
        plan = _PLANS[key] = _make_plan(q, k_cache, v_cache, block_tables, context_lens, cfg, bound, num_splits,
                                        max_context_len is not None, spread, key)  # fmt: skip
    return plan


def _make_plan(
    q, k_cache, v_cache, block_tables, context_lens, cfg, bound, num_splits, host_split, spread, key
):
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    splits = num_splits or choose_num_splits(batch, num_kv_heads, bound, num_sms(q.device), cfg.block_n)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(2, triton.next_power_of_2(splits))
    block_gm = triton.next_power_of_2(group)
    meta = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, block_gm), BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        DIRECT_OUT=splits == 1, DOT_PRECISION=dot_precision(q.dtype), UPCAST=upcast(q.dtype),
        BLOCK_GM=block_gm, BLOCK_S=block_s,
        # 128 fp32 per thread: a chunk of [BLOCK_GM, CHUNK_S, BLOCK_D] partials spread over the program's threads
        CHUNK_S=min(block_s, max(2, 128 * 32 * cfg.num_warps // (block_d * block_gm))),
        PREFETCH_IDS=splits > 1, HOST_SPLIT=host_split and splits > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    plan = DecodePlan(cfg, splits, "split", host_split and splits > 1, meta, key)
    if num_splits is None and cfg.streamk and batch:
        _, args = _split_args(q, k_cache, v_cache, block_tables, context_lens, 1.0, plan, bound)
        slots = num_sms(q.device) * programs_per_sm(_decode_split_kernel, args, meta, q.device)
        plan = plan._replace(schedule=choose_schedule(batch, batch * num_kv_heads * splits, slots, spread))
    return plan


# ----------------------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------------------


def _split_args(q, k_cache, v_cache, block_tables, context_lens, scale, plan, max_context_len):
    """(out, the split kernel's runtime arguments): ``out`` is new, the partials (when split) workspaces."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    splits = plan.splits
    out = torch.empty_like(q)
    if splits == 1:  # placeholders, never touched
        partial = lse = counters = out
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        n = batch * num_heads * splits
        partial = workspace("split_partial", q.device, n * head_dim, torch.float32)
        lse = workspace("split_lse", q.device, n, torch.float32)
        p_strides = (num_heads * splits * head_dim, splits * head_dim, head_dim)  # [B, Hq, splits, D]
        l_strides = (num_heads * splits, splits)  # [B, Hq, splits]
        counters = merge_counters(q.device, batch * num_kv_heads)
    host_pages = -(-max_context_len // page) if plan.host_split else 0
    args = (
        q, k_cache, v_cache, block_tables, context_lens.contiguous(), out, partial, lse, counters,
        scale * LOG2E, splits, num_kv_heads, host_pages, block_tables.shape[1] * page,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        *p_strides, *l_strides,
    )  # fmt: skip
    return out, args


def paged_decode_attention_split(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None,
    plan: DecodePlan,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """The split-KV kernel as ``plan`` says (arguments already checked): one launch, the merge inside it.

    On CUDA through ``launch.launch``, keyed by what Triton specializes on that the plan does not fix: the
    caller's strides, the index dtypes and each caller tensor's 16-byte alignment. ``out`` and the
    workspaces are ours: aligned, their strides set by the plan and ``q``. Of the ints (specialized on
    == 1 and % 16), the plan fixes ``num_splits`` and ``num_kv_heads`` and the key holds the strides;
    ``host_pages`` and ``table_tokens`` are not specialized, and as one sequence's page and token counts
    (far below 2**31) they stay i32, as when compiled.
    """
    batch, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    out, args = _split_args(q, k_cache, v_cache, block_tables, context_lens, scale, plan, max_context_len)
    if not batch:
        return out
    grid = (batch, k_cache.shape[2], plan.splits)
    if q.is_cuda:
        lens = args[4]
        key = (plan.key, q.stride(), k_cache.stride(), v_cache.stride(), block_tables.stride(),
               block_tables.dtype, lens.dtype, q.data_ptr() % 16, k_cache.data_ptr() % 16,
               v_cache.data_ptr() % 16, block_tables.data_ptr() % 16, lens.data_ptr() % 16)  # fmt: skip
        launch(_decode_split_kernel, grid, key, args, plan.meta)
    else:
        _decode_split_kernel[grid](*args, **plan.meta)
    return out
