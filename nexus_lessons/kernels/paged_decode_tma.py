"""Experimental: split-KV paged decode attention that loads each (page, KV head) as one TMA box.

Same math, arguments and partial/lse layout as ``paged_decode_attention_triton`` (paged_attention.py),
and the same merge kernel; only the split kernel differs. The question it answers: does a Hopper TMA
load per page beat the pointer gather (cp.async) of the existing kernel?

The pool ``[num_blocks, page, Hkv, D]`` (vLLM's NHD) is seen as a 2-D tensor ``[num_blocks * page, Hkv * D]``
with a host-side tensor descriptor whose box is ``[page, D]``: the rows of one page and the columns of one
KV head, i.e. one (page, KV head) is ``desc.load([page_id * page, kv_head * D])``, a single TMA copy of
16 strided 256-byte rows. The loop over a split's pages is a ``tl.range`` with ``num_stages`` so those
copies are issued ahead of use. ``pages_per_iter`` > 1 unrolls several pages per loop trip (each its own
load and online-softmax update), fewer trips for the same bytes.

Where the page id comes from matters to Triton's software pipeliner. As a scalar load from the block table
in the same trip as the TMA copy that needs it, the copy is an "indirect" load: the pipeliner splits the
stages between the two loads and keeps only about (num_stages - 2) / 2 copies of each page in flight
(1 at num_stages 3-4, 2 at 6; triton 3.9's TTGIR for sm_90). ``prefetch_ids=True`` loads the NEXT trip's
page ids as a small vector in the current trip (a loop-carried value), so the copy no longer depends on
a load of its own trip and gets num_stages - 1 buffers, for one more tiny load (an L1 hit) per trip.

Only the tail of a sequence needs masks: a split's length is a whole number of loop trips, so every split
but the one holding the last token runs the unmasked loop alone; that one finishes with a masked per-page
loop, where slots past the end get score -inf AND value 0 (stale slots may hold NaN: 0 * NaN is NaN).
A key row of NaN only spoils its own score column, which the -inf replaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import (
    LOG2E,
    MAX_SPLITS,
    _decode_merge_kernel,
    _descriptor,
    _dot_precision,
    _upcast,
    choose_num_splits,
    num_sms,
    tma_available,
)


@triton.jit
def _tma_page_step(
    acc, l_i, m_i, q, KDesc, VDesc, table, page_idx, pos0, end, kv_head, stride_btn, qk_scale,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, GIVEN_PAGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One page (tokens pos0 .. pos0 + PAGE_SIZE) of online softmax; MASKED: tokens >= end are dropped.
    ``page_idx`` is the page's index in the block table, or (GIVEN_PAGE) already its physical id."""
    if GIVEN_PAGE:
        page = page_idx
    else:
        page = tl.load(table + page_idx * stride_btn)
    row = page * PAGE_SIZE
    k = KDesc.load([row, kv_head * HEAD_DIM])  # [PAGE_SIZE, HEAD_DIM], one TMA box
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, PAGE_SIZE], base 2
    if MASKED:
        valid = (pos0 + tl.arange(0, PAGE_SIZE)) < end
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a step always holds >= 1 valid token
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = VDesc.load([row, kv_head * HEAD_DIM])
    if MASKED:
        v = tl.where(valid[:, None], v, 0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tma_decode_split_kernel(
    Q, KDesc, VDesc, BlockTables, ContextLens, Out, PartialOut, PartialLse,
    qk_scale, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    PAGES_PER_ITER: tl.constexpr, NUM_STAGES: tl.constexpr, PREFETCH_IDS: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (b, kv_head, split): all GROUP query heads of one KV head over one range of the context.

    The split's range is a whole number of PAGES_PER_ITER-page trips, so only the split that holds the
    last token has a tail (< one trip, masked, page by page). Outputs as ``_decode_split_kernel``:
    the normalised output (DIRECT_OUT) or the partial and its base-2 log-sum-exp (-inf when empty).
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    CHUNK: tl.constexpr = PAGE_SIZE * PAGES_PER_ITER
    context_len = tl.load(ContextLens + b)
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), CHUNK) * CHUNK
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)
    num_full = tl.maximum(end - start, 0) // CHUNK

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_btb
    first_page = start // PAGE_SIZE
    if PREFETCH_IDS:  # this trip's page ids were loaded by the previous trip (a loop-carried vector)
        offs_p = tl.arange(0, PAGES_PER_ITER)
        ids = tl.load(
            table + (first_page + offs_p) * stride_btn, mask=offs_p < num_full * PAGES_PER_ITER, other=0
        )
        for i in tl.range(0, num_full, num_stages=NUM_STAGES):
            nxt = tl.load(table + (first_page + (i + 1) * PAGES_PER_ITER + offs_p) * stride_btn,
                          mask=offs_p < (num_full - i - 1) * PAGES_PER_ITER, other=0)  # fmt: skip
            for j in tl.static_range(PAGES_PER_ITER):
                page = tl.sum(tl.where(offs_p == j, ids, 0))  # element j as a scalar
                acc, l_i, m_i = _tma_page_step(
                    acc, l_i, m_i, q, KDesc, VDesc, table, page, 0, end, kv_head,
                    stride_btn, qk_scale, HEAD_DIM, PAGE_SIZE, False, True, DOT_PRECISION, UPCAST,
                )  # fmt: skip
            ids = nxt
    else:  # the page id is a scalar load in the same trip as the TMA load that needs it
        for i in tl.range(0, num_full, num_stages=NUM_STAGES):
            for j in tl.static_range(PAGES_PER_ITER):
                page_idx = first_page + i * PAGES_PER_ITER + j
                acc, l_i, m_i = _tma_page_step(
                    acc, l_i, m_i, q, KDesc, VDesc, table, page_idx, page_idx * PAGE_SIZE, end, kv_head,
                    stride_btn, qk_scale, HEAD_DIM, PAGE_SIZE, False, False, DOT_PRECISION, UPCAST,
                )  # fmt: skip
    for pos0 in range(start + num_full * CHUNK, end, PAGE_SIZE):  # the tail: < PAGES_PER_ITER pages
        acc, l_i, m_i = _tma_page_step(
            acc, l_i, m_i, q, KDesc, VDesc, table, pos0 // PAGE_SIZE, pos0, end, kv_head,
            stride_btn, qk_scale, HEAD_DIM, PAGE_SIZE, True, False, DOT_PRECISION, UPCAST,
        )  # fmt: skip

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if DIRECT_OUT:
        o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_mask[:, None])
    else:
        p_ptrs = PartialOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :]
        tl.store(p_ptrs, out, mask=g_mask[:, None])
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


def pool_descriptor(cache: torch.Tensor):
    """A TMA descriptor over ``cache [num_blocks, page, Hkv, D]`` seen as [num_blocks * page, Hkv * D],
    box [page, D]. ValueError where no descriptor can describe the pool."""
    num_blocks, page, num_kv_heads, head_dim = cache.shape
    if num_blocks == 0:
        raise ValueError("the KV pool is empty")
    if cache.stride(0) != page * cache.stride(1):  # pages must follow each other: row = page_id * page + slot
        raise ValueError(f"TMA decode needs the pool's pages back to back (strides {tuple(cache.stride())})")
    rows = cache.as_strided((num_blocks * page, num_kv_heads, head_dim), cache.stride()[1:])
    desc = _descriptor(rows, page, head_dim)
    if desc is None:
        raise ValueError(
            f"no TMA descriptor for a pool of shape {tuple(cache.shape)}, strides {tuple(cache.stride())}, "
            f"{cache.dtype}: needs contiguous [Hkv, D] rows, D a power of 2 with >= 16 bytes, 16-byte alignment"
        )
    return desc


def paged_decode_attention_tma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    pages_per_iter: int = 1,
    num_warps: int = 4,
    num_stages: int = 4,
    prefetch_ids: bool = False,
) -> torch.Tensor:
    """``paged_decode_attention_triton`` with one TMA load per (page, KV head); same outputs.

    ``num_splits`` forces the split count; ``max_context_len`` only steers the split heuristic (default:
    the block table's width). ``pages_per_iter``: pages per loop trip; ``prefetch_ids``: load the next
    trip's page ids one trip ahead (see the module docstring). ValueError where the pool or the device
    cannot take descriptors.
    """
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    if not tma_available(q.device):
        raise ValueError("TMA decode needs tensor descriptors: a CUDA GPU of compute capability >= 9 (or the "
                         "Triton interpreter) and triton >= 3.4")  # fmt: skip
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if num_heads % num_kv_heads:
        raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
    if page_size < 16 or page_size > 256 or page_size != triton.next_power_of_2(page_size):
        raise ValueError(
            f"TMA decode needs a power-of-2 block size in [16, 256] (a tl.dot dimension), got {page_size}"
        )
    if pages_per_iter < 1 or (prefetch_ids and pages_per_iter != triton.next_power_of_2(pages_per_iter)):
        raise ValueError(
            f"pages_per_iter must be >= 1 (a power of 2 with prefetch_ids), got {pages_per_iter}"
        )
    k_desc, v_desc = pool_descriptor(k_cache), pool_descriptor(v_cache)
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * page_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context_len, num_sms(q.device),
                                       page_size * pages_per_iter)  # fmt: skip
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    direct = num_splits == 1
    if direct:  # placeholders, never touched
        partial, lse = out, out
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        partial = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
        p_strides, l_strides = partial.stride()[:3], lse.stride()[:2]
    _tma_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_desc, v_desc, block_tables, context_lens.contiguous(), out, partial, lse,
        scale * LOG2E, num_splits,
        *q.stride(), *block_tables.stride(), *out.stride(), *p_strides, *l_strides,
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_G=max(16, triton.next_power_of_2(group)),
        PAGES_PER_ITER=pages_per_iter, NUM_STAGES=num_stages, PREFETCH_IDS=prefetch_ids,
        DIRECT_OUT=direct, DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not direct:
        block_s = max(2, triton.next_power_of_2(num_splits))
        _decode_merge_kernel[(batch, num_heads)](
            partial, lse, out, num_splits,
            *p_strides, *l_strides, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_D=head_dim, PDL=False,
            num_warps=4 if block_s * head_dim <= 4096 else 8,
        )  # fmt: skip
    return out
