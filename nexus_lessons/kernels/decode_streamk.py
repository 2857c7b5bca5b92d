"""Stream-K decode attention, and the decode launcher that picks it or the split-KV kernel (``decode.py``).

Why. The split kernel launches B x Hkv x splits programs, so its speed depends on how that count falls
against the programs the GPU holds at once. On the H200 (4 programs per SM fit): 64 x 4096 is 512
programs, one wave 97% full, 101.8% of copy bandwidth; 68 x 4096 is 544, and the 16 left over run as a
second wave while 516 slots idle: 72.9%. A real batch has any size and mixed lengths. cuDNN's SDPA
schedules long contexts the same way as here ("lean attention").

The scheme (Stream-K, Osama et al. 2023; LeanAttention, Sanovar et al. 2024):

* Work is counted in tiles of BLOCK_N tokens of one (sequence, KV head) "unit". Sequence b has Hkv units
  of ``cdiv(len_b, BLOCK_N)`` tiles; all units laid end to end (sequence major, head minor) make T tiles.
* P programs (programs per SM x SMs: one wave; fewer if T is smaller) take the tiles
  ``[p*T//P, (p+1)*T//P)`` each, crossing unit boundaries as they go. Every program computes the layout
  itself from ``context_lens`` (a cumulative sum in registers), so nothing is planned on the host and the
  launch is the same for every step: CUDA-graph friendly.
* A unit that lies inside one program is written directly. A unit cut by program boundaries leaves one
  partial (normalised output, base-2 log-sum-exp) per piece: in slot 2p if it is program p's first
  segment, 2p + 1 if its last. The pieces' owners are p_first..p_last, computed from T and P alone, so the
  merge kernel that follows needs no bookkeeping (one program per unit, most exit at once).

Measured on the H200 (% of copy bandwidth, split / stream-K / "auto"): 64 x 4096 101.9 / 95.4 / 101.9;
68 x 4096 73.0 / 95.5 / 95.7; 256 x 1024 100.4 / 91.8 / 100.4; 1 x 32768 80.0 / 73.1 / 80.1; 64 sequences
of 1-8191 tokens 66.6 / 90.0 (stream-K once the caller passes the mean length, as PagedKVCache does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision, num_sms, upcast
from .decode import (
    STREAMK_MAX_BATCH,
    DecodeConfig,
    _decode_range,
    default_decode_config,
    paged_decode_attention_split,
    plan_decode,
    programs_per_sm,
)


@triton.jit
def _tile_layout(ContextLens, batch, num_kv_heads, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offsets, tiles per unit, first tile, per sequence; total tiles T), int32: registers held all along."""
    offs_b = tl.arange(0, BLOCK_B)
    lens = tl.load(ContextLens + offs_b, mask=offs_b < batch, other=0).to(tl.int32)
    unit_tiles = tl.cdiv(lens, BLOCK_N)
    seq_tiles = unit_tiles * num_kv_heads
    first = tl.cumsum(seq_tiles, 0) - seq_tiles
    return offs_b, unit_tiles, first, tl.sum(seq_tiles, 0)


@triton.jit
def _range_start(p, total, programs):
    """Program p's first tile, p*T//P (the product in int64: T*P passes 2^31 at large batches)."""
    return (p.to(tl.int64) * total // programs).to(tl.int32)


@triton.jit
def _owner(tile, total, programs):
    """The program whose range [p*T//P, (p+1)*T//P) holds ``tile``: the largest p with p*T//P <= tile."""
    return (((tile + 1).to(tl.int64) * programs - 1) // total).to(tl.int32)


@triton.jit
def _merge_pieces(
    PartialOut, PartialLse, Out, b, kv_head, g, unit0, unit_tiles, total, programs,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Out for query head g of one unit = its pieces' partials weighted by 2^(lse - lse_total).

    BLOCK_P pieces at a time, online across chunks. The partials are loaded before anything waits on
    the log-sum-exps, so both loads are in flight together.
    """
    p_first = _owner(unit0, total, programs)
    p_last = _owner(unit0 + unit_tiles - 1, total, programs)
    # p_first's piece is its first segment only if its range starts exactly at this unit.
    first_slot = 2 * p_first + (_range_start(p_first, total, programs) != unit0).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    m = float("-inf")
    l_sum = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(p_first, p_last + 1, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_mask = ps <= p_last
        rows = tl.where(ps == p_first, first_slot, 2 * ps) * GROUP + g
        parts = tl.load(PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=p_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # fmt: skip
        lse = tl.load(PartialLse + rows, mask=p_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))  # finite: every chunk holds >= 1 piece
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * parts, 0)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(Out + b * stride_ob + (kv_head * GROUP + g) * stride_oh + offs_d * stride_od,
             (acc / l_sum).to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)  # fmt: skip


@triton.jit
def _decode_streamk_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, Out, PartialOut, PartialLse,
    qk_scale, batch, num_kv_heads, max_programs,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Program p: tiles [p*T//P, (p+1)*T//P) of the batch's work, one segment per unit it touches.

    Block ids are prefetched one tile ahead (two K/V tiles in flight): faster at every measured shape."""
    pid = tl.program_id(0)
    offs_b, unit_tiles, first, total = _tile_layout(ContextLens, batch, num_kv_heads, BLOCK_B, BLOCK_N)
    programs = tl.minimum(max_programs, total)  # P <= T: no program is left without a tile
    if pid < programs:
        lo = _range_start(pid, total, programs)
        hi = _range_start(pid + 1, total, programs)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        gd_mask = g_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        t = lo
        while t < hi:
            # Which unit holds tile t: the last sequence starting at or before it, then the head.
            b = tl.sum(tl.where((first <= t) & (offs_b < batch), 1, 0), 0) - 1
            n = tl.sum(tl.where(offs_b == b, unit_tiles, 0), 0)
            seq0 = tl.sum(tl.where(offs_b == b, first, 0), 0)
            kv_head = (t - seq0) // n
            unit0 = seq0 + kv_head * n
            seg_end = tl.minimum(hi, unit0 + n)
            context_len = tl.load(ContextLens + b)
            start = ((t - unit0) * BLOCK_N).to(tl.int32)
            end = tl.minimum((seg_end - unit0) * BLOCK_N, context_len).to(tl.int32)
            heads = kv_head * GROUP + offs_g
            q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                        mask=gd_mask, other=0.0)  # fmt: skip
            if UPCAST:
                q = q.to(tl.float32)
            table = BlockTables + b.to(tl.int64) * stride_btb
            acc, m_i, l_i = _decode_range(
                q, table, KCache + kv_head * stride_kch, VCache + kv_head * stride_vch, start, end, end, qk_scale,
                stride_btn, stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct, stride_vcd,
                HEAD_DIM, PAGE_SIZE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PRECISION, UPCAST, True,
            )  # fmt: skip
            out = acc / l_i[:, None]  # every segment holds >= 1 token, so l_i > 0 (padded heads too)
            if (t == unit0) & (seg_end == unit0 + n):
                tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                         out.to(Out.dtype.element_ty), mask=gd_mask)  # fmt: skip
            else:
                slot = 2 * pid + (t != lo).to(tl.int32)
                tl.store(PartialOut + (slot * GROUP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :], out, mask=gd_mask)
                tl.store(PartialLse + slot * GROUP + offs_g, m_i + tl.log2(l_i), mask=g_mask)
            t = seg_end


@triton.jit
def _streamk_merge_kernel(
    PartialOut, PartialLse, Out, ContextLens, batch, num_kv_heads, max_programs,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Program (b, query head): merge its unit's pieces if programs cut the unit; else it is done already."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // GROUP
    offs_b, unit_tiles, first, total = _tile_layout(ContextLens, batch, num_kv_heads, BLOCK_B, BLOCK_N)
    programs = tl.minimum(max_programs, total)
    n = tl.sum(tl.where(offs_b == b, unit_tiles, 0), 0)
    unit0 = tl.sum(tl.where(offs_b == b, first, 0), 0) + kv_head * n
    if _owner(unit0, total, programs) != _owner(unit0 + n - 1, total, programs):
        _merge_pieces(PartialOut, PartialLse, Out, b, kv_head, tl.program_id(1) % GROUP, unit0, n, total, programs,
                      stride_ob, stride_oh, stride_od, GROUP, HEAD_DIM, BLOCK_D, BLOCK_P)  # fmt: skip


_WAVE: dict[tuple, int] = {}  # programs in one full wave, per compiled variant


def paged_decode_attention_streamk(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_programs: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Triton twin of ``paged_decode_attention_ref`` on the stream-K schedule (arguments already checked).

    ``num_programs`` overrides the grid (tests use it to cut units in many places); every program gets at
    least one tile, so more programs than tiles just means fewer run.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_decode_config(q.dtype, head_dim, q.device)
    if batch > STREAMK_MAX_BATCH:
        raise ValueError(f"the stream-K decode holds at most {STREAMK_MAX_BATCH} sequences, got {batch}")
    if num_programs is not None and num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    lens = context_lens.contiguous()
    block_b = max(16, triton.next_power_of_2(batch))
    block_d = triton.next_power_of_2(head_dim)
    meta = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1], BLOCK_B=block_b,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=upcast(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip

    def launch_args(programs: int, partial: torch.Tensor, lse: torch.Tensor) -> tuple:
        return (q, k_cache, v_cache, block_tables, lens, out, partial, lse,
                scale * LOG2E, batch, num_kv_heads, programs,
                *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride())  # fmt: skip

    programs = num_programs
    if programs is None:  # one wave of the variant that will run (compiled with float32 partials)
        key = (q.device, q.dtype, block_b, group, head_dim, k_cache.shape[1], cfg)
        programs = _WAVE.get(key)
        if programs is None:
            placeholder = torch.empty(1, device=q.device, dtype=torch.float32)
            per_sm = programs_per_sm(_decode_streamk_kernel, launch_args(2, placeholder, placeholder), meta, q.device)
            programs = _WAVE[key] = per_sm * num_sms(q.device)
    partial = torch.empty(2 * programs, group, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(2 * programs, group, device=q.device, dtype=torch.float32)
    _decode_streamk_kernel[(programs,)](*launch_args(programs, partial, lse), **meta)
    _streamk_merge_kernel[(batch, num_heads)](
        partial, lse, out, lens, batch, num_kv_heads, programs, *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        BLOCK_P=max(2, min(64, 4096 // block_d)), num_warps=4,
    )  # fmt: skip
    return out


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
    """Triton twin of ``paged_decode_attention_ref`` (arguments already checked): the split-KV kernel, or
    stream-K where the split grid would idle (``decode.choose_schedule``).

    Everything is planned from host facts: shapes, and the caller's ``max_context_len`` (an upper bound on
    ``context_lens``; without it the block table's width) and ``mean_context_len``. Nothing is read back
    from the GPU. A bound that is too small costs speed, not correctness: the last split takes the rest.
    ``num_splits`` forces the split count and with it the split kernel.
    """
    plan = plan_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits, max_context_len,
                       mean_context_len, config)  # fmt: skip
    if plan.schedule == "streamk":
        return paged_decode_attention_streamk(q, k_cache, v_cache, block_tables, context_lens, scale, config=plan.config)
    return paged_decode_attention_split(q, k_cache, v_cache, block_tables, context_lens, scale, plan, max_context_len)
