"""Varlen extend (prefill) attention over a paged KV cache: many new tokens per sequence, causal or tree-masked.

Queries are packed ``q [total_q, Hq, D]``, sequence b's rows ``query_start_loc[b]:query_start_loc[b+1]``;
they are the last ``q_len`` of its ``context_lens[b]`` tokens, whose K/V are already in the cache. The
PyTorch twin is ``reference.paged_prefill_attention_ref``.

Why the kernel looks like this:

* Extend is compute-bound: a FlashAttention-2 style kernel over pages, its key loop split in two: the
  keys every query of the tile sees (no mask work at all), then the few tiles on the causal diagonal
  (or under the custom mask) with masking.
* With ``k_new, v_new`` (SGLang's design) the step's new tokens' K/V are also at hand as packed
  contiguous rows (the tensors just written into their slots), so only the cached prefix is gathered
  through the block table and the new part is read from those rows. Contiguous rows are what Hopper's
  TMA loads (tensor descriptors) need; a gathered load never gets them. H200, 8 x 2048 causal, bf16:
  TMA 348 TFLOP/s, the same rows through ordinary loads 314, every key gathered from the pages 287.
  Where descriptors cannot apply (before Hopper, float32, a layout no descriptor describes) the rows
  are read with ordinary loads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision, interpreting, upcast
from .decode import _online_softmax


@dataclass(frozen=True)
class ExtendConfig:
    """Tile and launch options of the extend kernel (the benchmark and the compile check pass their own)."""

    block_m: int = 128  # query tokens per program
    block_n: int = 64  # keys per iteration (several pages)
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True  # read Q and k_new/v_new through tensor descriptors where the device and layout allow


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


@triton.jit(do_not_specialize=["num_m_blocks", "stride_btb"])  # they vary step to step in an engine
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
    index = device.index
    if device.type == "cuda" and index is None and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return _tma_available(device.type, index)


@functools.lru_cache(maxsize=None)
def _tma_available(kind: str, index: int | None) -> bool:
    if _tensor_descriptor_class() is None:
        return False
    if kind == "cuda":
        if not torch.cuda.is_available():  # compile_check picks GPU configs on a machine without one
            return False
        return torch.cuda.get_device_capability(index)[0] >= 9
    return interpreting()


def default_extend_config(dtype: torch.dtype, head_dim: int, device: torch.device, has_mask: bool = False) -> ExtendConfig:
    """Fixed tiles: FlashAttention-2's usual choice on Hopper for 16-bit D <= 128 (128 x 128, 8 warps, 3
    stages: the best of the benchmark's sweep on the H200 at 8 x 2048 causal, with and without k_new);
    smaller tiles where registers would spill (float32's exact dot, the custom-mask path, D > 128;
    checked with ptxas, sm_90). Descriptors for float32 spill badly (ptxas, sm_90): ordinary loads there.
    The CPU interpreter takes ordinary loads (the tests run the descriptor path explicitly)."""
    return _extend_config(dtype, head_dim, device.type == "cuda", has_mask)


@functools.lru_cache(maxsize=None)
def _extend_config(dtype: torch.dtype, head_dim: int, cuda: bool, has_mask: bool) -> ExtendConfig:
    if not cuda:
        return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, tma=False)
    if dtype == torch.float32:
        return ExtendConfig(block_m=32, block_n=16, num_warps=8, num_stages=2, tma=False)
    if has_mask:
        return ExtendConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    if head_dim > 128:
        return ExtendConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    return ExtendConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


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
    """Triton twin of ``paged_prefill_attention_ref`` (arguments already checked).

    ``max_query_len`` sizes the grid; without it the host's bound is used (no sequence has more new tokens
    than ``total_q`` or than its block-table row holds), and programs past a sequence's queries exit at once.
    ``k_new, v_new [total_q, Hkv, D]``: the new tokens' K/V as packed rows.
    """
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    batch = context_lens.shape[0]
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_extend_config(q.dtype, head_dim, q.device, custom_mask is not None)
    out = torch.empty_like(q)
    if max_query_len is None:
        max_query_len = min(total_q, block_tables.shape[1] * k_cache.shape[1])
    if total_q == 0 or batch == 0 or max_query_len == 0:
        return out
    num_m_blocks = triton.cdiv(max_query_len, cfg.block_m)
    if custom_mask is None:
        mask, mask_strides = q, (0, 0)  # placeholder, never read (HAS_MASK=False)
    else:
        mask = custom_mask.to(torch.int8)
        mask_strides = mask.stride()
    new_kv = k_new is not None
    descs = None
    if new_kv and cfg.tma and tma_available(q.device):
        descs = (_descriptor(q, cfg.block_m, head_dim), _descriptor(k_new, cfg.block_n, head_dim),
                 _descriptor(v_new, cfg.block_n, head_dim))  # fmt: skip
        if any(d is None for d in descs):  # a layout no descriptor can describe: ordinary loads instead
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
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=upcast(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
