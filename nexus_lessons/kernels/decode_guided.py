"""Guided self-scheduling for decode: persistent programs claim pieces of work, big ones first.

Why. A launch of the split kernel ends with its slowest program. On the H200 at 64 x 4096 the programs stream
at rates a few percent apart, and the last ~5% of the launch runs with fewer and fewer of them
(``decode_timeline_h200_run1.json``). Here one wave of programs takes pieces from a counter: every
(sequence, KV head) unit is cut at the same fractions of the context (1/2, 1/4, ... of it), all units' first
pieces are claimed before any second piece, and so on, so the last pieces claimed are the smallest and every
program is busy until the queue runs dry. Each piece has its own partial and the last piece of a unit to
finish merges them in piece order, so the output does not depend on which program ran what.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .paged_attention import (
    LOG2E,
    DecodeConfig,
    _decode_range,
    _dot_precision,
    _merge_heads,
    _upcast,
    default_decode_config,
    launch_options,
    merge_counters,
    num_sms,
    programs_per_sm,
)


@triton.jit
def _decode_guided_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, Out, PartialOut, PartialLse, Counters, Bounds,
    qk_scale, num_units, num_kv_heads, num_pieces, programs, rounds,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVICT: tl.constexpr, PREFETCH_IDS: tl.constexpr,
    BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
):  # fmt: skip
    """A persistent program: claim piece k (round k // units, unit k % units), stream it, store its partial."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    out_mask = g_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    claim = Counters + num_units  # the piece counter sits after the per-unit arrival counters
    k = tl.atomic_add(claim, 1)
    while k < num_pieces:
        r = k // num_units
        unit = k % num_units
        b = unit // num_kv_heads
        kv_head = unit % num_kv_heads
        context_len = tl.load(ContextLens + b)
        start = tl.load(Bounds + r) * PAGE_SIZE
        stop = tl.load(Bounds + r + 1) * PAGE_SIZE
        end = tl.where(r == rounds - 1, context_len, tl.minimum(stop, context_len))
        heads = kv_head * GROUP + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=out_mask,
                    other=0.0)  # fmt: skip
        if UPCAST:
            q = q.to(tl.float32)
        acc, m_i, l_i = _decode_range(
            q, BlockTables + b.to(tl.int64) * stride_btb, KCache + kv_head * stride_kch, VCache + kv_head * stride_vch,
            start, end, end, qk_scale, stride_btn, stride_kcb, stride_kct, stride_kcd, stride_vcb, stride_vct,
            stride_vcd, HEAD_DIM, PAGE_SIZE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PRECISION, UPCAST, EVICT, PREFETCH_IDS,
        )  # fmt: skip
        nonempty = l_i > 0.0
        tl.store(PartialOut + b * stride_pb + heads[:, None] * stride_ph + r * stride_ps + offs_d[None, :],
                 acc / tl.where(nonempty, l_i, 1.0)[:, None], mask=out_mask)  # fmt: skip
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + r, lse, mask=g_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(Counters + unit, 1, sem="acq_rel", scope="gpu")
        if arrived == rounds - 1:  # the unit's last piece to finish merges all of them, in piece order
            tl.debug_barrier()
            _merge_heads(PartialOut, PartialLse, Out, b, kv_head * GROUP, rounds,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
                         GROUP, HEAD_DIM, BLOCK_GM, BLOCK_S, BLOCK_D, CHUNK_S)  # fmt: skip
            tl.store(Counters + unit, 0)
        k = tl.atomic_add(claim, 1)
    if k == num_pieces + programs - 1:  # the last claim of the launch: reset the counter for the next one
        tl.store(claim, 0)


def piece_bounds(pages: int, fractions: tuple[float, ...]) -> list[int]:
    """Page boundaries of the pieces: cumulative ``fractions`` of ``pages``, rounded, every piece >= 1 page."""
    if not fractions or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    bounds, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(min(pages - (len(fractions) - len(bounds)), max(bounds[-1] + 1, round(pages * acc))))
    return bounds + [pages]


_BOUNDS: dict[tuple, torch.Tensor] = {}


def paged_decode_attention_guided(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_context_len: int,
    fractions: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625, 0.0625),
    num_programs: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Decode attention on the guided schedule (arguments already checked). ``max_context_len`` bounds the
    lengths: the pieces are cut from it, and the last piece of a unit takes whatever is left."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_decode_config(q.dtype, head_dim, q.device)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    pages = max(len(fractions), math.ceil(max_context_len / k_cache.shape[1]))
    key = (q.device.type, q.device.index, pages, tuple(fractions))
    if key not in _BOUNDS:  # cached: a CUDA graph keeps the pointer it was captured with
        _BOUNDS[key] = torch.tensor(piece_bounds(pages, tuple(fractions)), dtype=torch.int32, device=q.device)
    bounds = _BOUNDS[key]
    rounds = len(fractions)
    units = batch * num_kv_heads
    counters = merge_counters(q.device, units + 1)
    partial = torch.empty(batch, num_heads, rounds, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, num_heads, rounds, device=q.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(2, triton.next_power_of_2(rounds))
    meta = dict(
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype), PREFETCH_IDS=cfg.prefetch_ids is not False,
        EVICT="evict_first" if cfg.evict_first else "",
        BLOCK_GM=triton.next_power_of_2(group), BLOCK_S=block_s,
        CHUNK_S=min(block_s, max(2, 128 * 32 * cfg.num_warps // (block_d * triton.next_power_of_2(group)))),
        **launch_options(cfg),
    )  # fmt: skip

    def args(programs: int) -> tuple:
        return (q, k_cache, v_cache, block_tables, context_lens.contiguous(), out, partial, lse, counters, bounds,
                scale * LOG2E, units, num_kv_heads, units * rounds, programs, rounds,
                *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
                *partial.stride()[:3], *lse.stride()[:2])  # fmt: skip

    programs = num_programs
    if programs is None:  # one wave: every program resident, so each claims until the queue is empty
        programs = (cfg.programs_per_sm or programs_per_sm(_decode_guided_kernel, args(1), meta, q.device)) * num_sms(
            q.device
        )
    _decode_guided_kernel[(programs,)](*args(programs), **meta)
    return out
