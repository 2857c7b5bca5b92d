"""Triton paged attention over a quantized KV pool: decode and extend, dequantizing in registers.

Twins of ``quant_decode_attention_ref`` / ``quant_extend_attention_ref``. The kernels read the stored
bytes (int8, float8 e4m3 or packed int4) and their scales straight from the pages and never write a
dequantized copy anywhere: the scales are folded into the arithmetic instead.

* 8-bit formats, one power-of-two scale per (token, head): q . (q8 * 2^e) = (q . q8) * 2^e, so the key
  scale multiplies a column of the score tile, and the value scale a column of the probabilities before
  they meet V. The tile itself is converted to the dot's dtype exactly (int8 and e4m3 values are exact in
  bf16).
* int4 keys, per-channel scale s and minimum z of one block: q . (l * s + z) = (q * s) . l + q . z: in
  decode, when a tile lies inside one page, the scale moves onto q (a [GROUP, D] multiply per tile instead
  of a [N, D] one) and the minimum becomes one bias per query row; otherwise (extend's many query rows, or
  a tile spanning pages) the tile is dequantized element-wise.
  int4 values, one scale per (token, head): folded into the probabilities like the 8-bit formats.
* Every tile is handled as two halves of the head dimension, [0, D/2) and [D/2, D): the low and high
  nibbles of int4's packed bytes (the 8-bit formats use the same two-dot split, so one code path serves all).
* Integer levels become floats with the "magic number" trick (OR the bits into the mantissa of 2^23, then
  subtract 2^23): integer ALU work instead of conversion instructions, which run at a quarter of the rate
  on Hopper.
* int4's tail (the block still being filled, in full precision) is one more short loop per sequence.

The decode kernel follows lesson 02's (``paged_attention.py``): all query heads of one KV head in one
[GROUP, D] tile, tiles spanning several pages, split-KV with the last split merging the log-sum-exps
(``_merge_heads``), online softmax in base 2, and no host sync (the split count comes from the caller's
``max_context_len`` or the block table's width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision, num_sms, upcast
from .decode import _merge_heads, _online_softmax, choose_num_splits, merge_counters
from .quant_reference import QuantizedKV

FMT_IDS = {"int8": 0, "fp8": 1, "int4": 2}


@triton.jit
def _u8_levels(b):
    """uint8-valued int32 tensor -> float32 with the same value (magic-number conversion)."""
    return (b | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _levels8(x, FMT: tl.constexpr):
    """A loaded int8 tile, or float8 e4m3 bits (passed as uint8), -> float32 values."""
    if FMT == 0:
        u = x.to(tl.uint8, bitcast=True).to(tl.int32)
        return ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
    else:
        return x.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _pow2(e):
    return ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quant_scores(
    q_lo, q_hi, q32_lo, q32_hi, KQ, KS, KZ, table, blk, in_block, n0, n_mask,
    stride_kb, stride_kt, stride_sb, stride_st, stride_zd, stride_btn, HALF,
    FMT: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    """Scores q . k over a tile of BLOCK_N quantized keys (not yet times 1/sqrt(D)): [rows of q, BLOCK_N].

    ``KQ``, ``KS``, ``KZ``: this KV head's data, scales and (int4) zeros; ``blk``/``in_block``: each key's
    page and offset in it. q_lo/q_hi: q's two halves in DOT_DTYPE; q32_lo/q32_hi: the same in float32.
    FOLD (int4, a tile inside one page): scale q instead of the keys; worth it when q has few rows (decode).
    int4 key scales are [page, channel] (stride_sb, stride_zd); 8-bit ones [page, token] (stride_sb, stride_st).
    """
    offs_c = tl.arange(0, BLOCK_HALF)
    c_mask = offs_c < HALF
    mask = n_mask[:, None] & c_mask[None, :]
    rows = KQ + blk[:, None] * stride_kb + in_block[:, None] * stride_kt + offs_c[None, :]
    if FMT == 2:
        b = tl.load(rows, mask=mask, other=0).to(tl.int32)
        lo = _u8_levels(b & 15)
        hi = _u8_levels(b >> 4)
        if BLOCK_N <= PAGE_SIZE:  # one page, one set of channel scales and zeros for the whole tile
            page = tl.load(table + (n0 // PAGE_SIZE) * stride_btn).to(tl.int64)
            meta = (page * stride_sb + offs_c * stride_zd)[None, :]
            meta_mask = c_mask[None, :]
        else:  # keys from several pages: each key's page's scales
            meta = blk[:, None] * stride_sb + offs_c[None, :] * stride_zd
            meta_mask = mask
        s_lo = tl.load(KS + meta, mask=meta_mask, other=0.0).to(tl.float32)
        s_hi = tl.load(KS + meta + HALF * stride_zd, mask=meta_mask, other=0.0).to(tl.float32)
        z_lo = tl.load(KZ + meta, mask=meta_mask, other=0.0).to(tl.float32)
        z_hi = tl.load(KZ + meta + HALF * stride_zd, mask=meta_mask, other=0.0).to(tl.float32)
        if FOLD and BLOCK_N <= PAGE_SIZE:  # the scale goes onto q, the zero into one bias per query row
            # Levels centred (0..15 -> -8..7, the 8 moved into the bias): q * scale is rounded to DOT_DTYPE,
            # and that rounding error is multiplied by the levels, so smaller levels give smaller score errors.
            bias = tl.sum(q32_lo * (z_lo + 8.0 * s_lo), 1) + tl.sum(q32_hi * (z_hi + 8.0 * s_hi), 1)
            s = tl.dot((q32_lo * s_lo).to(DOT_DTYPE), tl.trans((lo - 8.0).to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            s = tl.dot((q32_hi * s_hi).to(DOT_DTYPE), tl.trans((hi - 8.0).to(DOT_DTYPE)), s,
                       input_precision=DOT_PRECISION)  # fmt: skip
            s = s + bias[:, None]
        else:  # dequantize the tile element-wise
            s = tl.dot(q_lo, tl.trans((lo * s_lo + z_lo).to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            s = tl.dot(q_hi, tl.trans((hi * s_hi + z_hi).to(DOT_DTYPE)), s, input_precision=DOT_PRECISION)
    else:
        lo = _levels8(tl.load(rows, mask=mask, other=0), FMT)
        hi = _levels8(tl.load(rows + HALF, mask=mask, other=0), FMT)
        s = tl.dot(q_lo, tl.trans(lo.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        s = tl.dot(q_hi, tl.trans(hi.to(DOT_DTYPE)), s, input_precision=DOT_PRECISION)
        e = tl.load(KS + blk * stride_sb + in_block * stride_st, mask=n_mask, other=0)
        s = s * _pow2(e)[None, :]
    return s


@triton.jit
def _quant_accumulate(
    p, acc_lo, acc_hi, VQ, VS, blk, in_block, n_mask, stride_vb, stride_vt, stride_sb, stride_st, HALF,
    FMT: tl.constexpr, BLOCK_HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc += p @ v over a tile of quantized values; each value's scale multiplies its column of p."""
    offs_c = tl.arange(0, BLOCK_HALF)
    mask = n_mask[:, None] & (offs_c < HALF)[None, :]
    rows = VQ + blk[:, None] * stride_vb + in_block[:, None] * stride_vt + offs_c[None, :]
    if FMT == 2:
        b = tl.load(rows, mask=mask, other=0).to(tl.int32)
        lo = _u8_levels(b & 15) - 8.0
        hi = _u8_levels(b >> 4) - 8.0
        scale = tl.load(VS + blk * stride_sb + in_block * stride_st, mask=n_mask, other=0.0).to(tl.float32)
    else:
        lo = _levels8(tl.load(rows, mask=mask, other=0), FMT)
        hi = _levels8(tl.load(rows + HALF, mask=mask, other=0), FMT)
        scale = _pow2(tl.load(VS + blk * stride_sb + in_block * stride_st, mask=n_mask, other=0))
    pv = (p * scale[None, :]).to(DOT_DTYPE)
    acc_lo = tl.dot(pv, lo.to(DOT_DTYPE), acc_lo, input_precision=DOT_PRECISION)
    acc_hi = tl.dot(pv, hi.to(DOT_DTYPE), acc_hi, input_precision=DOT_PRECISION)
    return acc_lo, acc_hi


@triton.jit
def _rows_scores(q_lo, q_hi, K, rows, n_mask, stride_r, HALF, BLOCK_HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Scores against full-precision keys stored as rows (int4's tail, or extend's new tokens)."""
    offs_c = tl.arange(0, BLOCK_HALF)
    mask = n_mask[:, None] & (offs_c < HALF)[None, :]
    ptrs = K + rows[:, None] * stride_r + offs_c[None, :]
    k_lo = tl.load(ptrs, mask=mask, other=0.0).to(DOT_DTYPE)
    k_hi = tl.load(ptrs + HALF, mask=mask, other=0.0).to(DOT_DTYPE)
    s = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PRECISION)
    return tl.dot(q_hi, tl.trans(k_hi), s, input_precision=DOT_PRECISION)


@triton.jit
def _rows_accumulate(p, acc_lo, acc_hi, V, rows, n_mask, stride_r, HALF, BLOCK_HALF: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    offs_c = tl.arange(0, BLOCK_HALF)
    mask = n_mask[:, None] & (offs_c < HALF)[None, :]
    ptrs = V + rows[:, None] * stride_r + offs_c[None, :]
    pv = p.to(DOT_DTYPE)
    acc_lo = tl.dot(pv, tl.load(ptrs, mask=mask, other=0.0).to(DOT_DTYPE), acc_lo, input_precision=DOT_PRECISION)
    acc_hi = tl.dot(pv, tl.load(ptrs + HALF, mask=mask, other=0.0).to(DOT_DTYPE), acc_hi, input_precision=DOT_PRECISION)
    return acc_lo, acc_hi


@triton.jit
def _quant_range(
    acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, q32_lo, q32_hi, KQ, VQ, KS, VS, KZ, table, start, end, qk_scale,
    stride_kb, stride_kt, stride_ksb, stride_kst, stride_kzd, stride_vsb, stride_vst, stride_btn, HALF,
    FMT: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    """Online softmax of every row of q over quantized tokens [start, end) of one sequence (all visible;
    start a multiple of BLOCK_N). K and V share one layout, so their data strides are the same."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(table + (offs_n // PAGE_SIZE) * stride_btn, mask=n_mask, other=0).to(tl.int64)
        in_block = offs_n % PAGE_SIZE
        s = _quant_scores(q_lo, q_hi, q32_lo, q32_hi, KQ, KS, KZ, table, blk, in_block, n0, n_mask,
                          stride_kb, stride_kt, stride_ksb, stride_kst, stride_kzd, stride_btn, HALF,
                          FMT, PAGE_SIZE, BLOCK_N, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION, FOLD) * qk_scale  # fmt: skip
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i, False)  # each tile has >= 1 visible key
        acc_lo, acc_hi = _quant_accumulate(p, acc_lo * alpha[:, None], acc_hi * alpha[:, None], VQ, VS, blk, in_block,
                                           n_mask, stride_kb, stride_kt, stride_vsb, stride_vst, HALF,
                                           FMT, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
    return acc_lo, acc_hi, m_i, l_i


@triton.jit
def _tail_range(
    acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, KT, VT, start, end, first, qk_scale, stride_tt, HALF,
    BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over tokens [start, end) held in full precision in one tail slot, whose row 0 is
    token ``first``. ``KT``/``VT`` point at the slot and this KV head. Runs once per sequence: not
    pipelined, so it takes no shared memory from the main loop's stages."""
    for n0 in tl.range(start, end, BLOCK_N, num_stages=1):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        rows = (offs_n - first).to(tl.int64)
        s = _rows_scores(q_lo, q_hi, KT, rows, n_mask, stride_tt, HALF, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i, True)
        acc_lo, acc_hi = _rows_accumulate(p, acc_lo * alpha[:, None], acc_hi * alpha[:, None], VT, rows, n_mask,
                                          stride_tt, HALF, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
    return acc_lo, acc_hi, m_i, l_i


# ----------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantDecodeConfig:
    """Tile and launch options of the quantized decode kernel (the GPU benchmark sweeps these)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_quant_decode_config(fmt: str, page_size: int, device: torch.device) -> QuantDecodeConfig:
    """Fixed tiles (no autotune: the interpreter cannot run it, and decode shapes change every step).

    int4 tiles stay inside one page, so the keys' per-page channel scales fold into q; a tile spanning
    pages would gather the scales row by row (BLOCK_N / page times the traffic of the scales themselves).
    """
    if fmt == "int4":
        return QuantDecodeConfig(block_n=min(page_size, 64 if device.type == "cuda" else 32),
                                 num_stages=3 if device.type == "cuda" else 1)  # fmt: skip
    if device.type != "cuda":
        return QuantDecodeConfig(block_n=32, num_warps=4, num_stages=1)
    return QuantDecodeConfig(block_n=64)


@triton.jit
def _quant_decode_kernel(
    Q, KQ, VQ, KS, VS, KZ, KT, VT, BlockTables, ContextLens, TailSlots, Out, PartialOut, PartialLse, Counters,
    qk_scale, num_splits, num_kv_heads, HALF,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_ksb, stride_kst, stride_ksh, stride_kzd,
    stride_vsb, stride_vst, stride_vsh,
    stride_tn, stride_tt, stride_th,
    stride_btb, stride_btn,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    FMT: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_S: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, kv_head, split): the GROUP query heads of one KV head over one share of the context.

    Tokens [0, full) are quantized (full = the context for the 8-bit formats; int4: the tokens of its full
    blocks); [full, context_len) are int4's tail, in full precision. With one split the output is
    written directly; otherwise partials + base-2 log-sum-exps, merged by the last split to arrive.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(ContextLens + b)
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)
    if FMT == 2:
        full = (context_len // PAGE_SIZE) * PAGE_SIZE
    else:
        full = context_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, BLOCK_HALF)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    c_mask = offs_c < HALF
    qmask = g_mask[:, None] & c_mask[None, :]
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_c[None, :]
    q32_lo = tl.load(q_ptrs, mask=qmask, other=0.0).to(tl.float32)
    q32_hi = tl.load(q_ptrs + HALF, mask=qmask, other=0.0).to(tl.float32)
    q_lo, q_hi = q32_lo.to(DOT_DTYPE), q32_hi.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_lo = tl.zeros([BLOCK_G, BLOCK_HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_G, BLOCK_HALF], tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_btb
    acc_lo, acc_hi, m_i, l_i = _quant_range(
        acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, q32_lo, q32_hi,
        KQ + kv_head * stride_kh, VQ + kv_head * stride_kh, KS + kv_head * stride_ksh, VS + kv_head * stride_vsh,
        KZ + kv_head * stride_ksh, table, start, tl.minimum(end, full), qk_scale,
        stride_kb, stride_kt, stride_ksb, stride_kst, stride_kzd, stride_vsb, stride_vst, stride_btn, HALF,
        FMT, PAGE_SIZE, BLOCK_N, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION, True,
    )  # fmt: skip
    if FMT == 2:
        slot = tl.maximum(tl.load(TailSlots + b), 0).to(tl.int64)
        tail = slot * stride_tn + kv_head * stride_th
        acc_lo, acc_hi, m_i, l_i = _tail_range(
            acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, KT + tail, VT + tail, tl.maximum(start, full), end, full,
            qk_scale, stride_tt, HALF, BLOCK_N, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip

    nonempty = l_i > 0.0
    inv = 1.0 / tl.where(nonempty, l_i, 1.0)
    out_lo = acc_lo * inv[:, None]
    out_hi = acc_hi * inv[:, None]
    if DIRECT_OUT:
        o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_c[None, :]
        tl.store(o_ptrs, out_lo.to(Out.dtype.element_ty), mask=qmask)
        tl.store(o_ptrs + HALF, out_hi.to(Out.dtype.element_ty), mask=qmask)
    else:
        p_ptrs = PartialOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_c[None, :]
        tl.store(p_ptrs, out_lo, mask=qmask)
        tl.store(p_ptrs + HALF, out_hi, mask=qmask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)
        # The last split of this (sequence, KV head) to arrive merges (lesson 02's fused merge).
        tl.debug_barrier()
        counter = Counters + b * num_kv_heads + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.debug_barrier()
            _merge_heads(PartialOut, PartialLse, Out, b, kv_head * GROUP, num_splits,
                         stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, 1,
                         GROUP, HEAD_DIM, BLOCK_GM, BLOCK_S, BLOCK_D, CHUNK_S)  # fmt: skip
            tl.store(counter, 0)


def _dot_dtype(dtype: torch.dtype):
    if upcast(dtype) or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _data(t: torch.Tensor) -> torch.Tensor:
    """float8 pools go to the kernels as their bytes (a masked load needs an `other` the interpreter can
    cast; the kernel reinterprets them as e4m3)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _tail_tensors(kv: QuantizedKV, q: torch.Tensor):
    """int4's tail pools, or placeholders never read (the 8-bit formats have no tail)."""
    if kv.fmt == "int4":
        return kv.k_tail, kv.v_tail, kv.k_zero
    return q, q, kv.k_scale


def quant_decode_attention_triton(
    q: torch.Tensor,
    kv: QuantizedKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    tail_slots: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    config: QuantDecodeConfig | None = None,
) -> torch.Tensor:
    """Triton twin of ``quant_decode_attention_ref``. ``max_context_len`` (a host bound; default: the block
    table's width) and the SM count choose the split count unless ``num_splits`` forces it."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv.num_heads
    page = kv.block_size
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_quant_decode_config(kv.fmt, page, q.device)
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * page
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context_len, num_sms(q.device), cfg.block_n, 2)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    direct = num_splits == 1
    if direct:
        partial, lse, p_strides, l_strides = out, out, (0, 0, 0), (0, 0)
    else:
        partial = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
        p_strides, l_strides = partial.stride()[:3], lse.stride()[:2]
    counters = merge_counters(q.device, batch * num_kv_heads) if not direct else context_lens
    k_tail, v_tail, k_zero = _tail_tensors(kv, q)
    tails = tail_slots if tail_slots is not None else context_lens  # never read for the 8-bit formats
    int4 = kv.fmt == "int4"
    half = head_dim // 2
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(2, triton.next_power_of_2(num_splits))
    block_gm = triton.next_power_of_2(group)
    _quant_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, _data(kv.k), _data(kv.v), kv.k_scale, kv.v_scale, k_zero, k_tail, v_tail, block_tables, context_lens.contiguous(),
        tails, out, partial, lse, counters,
        scale * LOG2E, num_splits, num_kv_heads, half,
        q.stride(0), q.stride(1),
        kv.k.stride(0), kv.k.stride(1), kv.k.stride(2),
        kv.k_scale.stride(0), 0 if int4 else kv.k_scale.stride(1), kv.k_scale.stride(1) if int4 else kv.k_scale.stride(2),
        kv.k_scale.stride(2) if int4 else 0,
        kv.v_scale.stride(0), kv.v_scale.stride(1), kv.v_scale.stride(2),
        *(k_tail.stride()[:3] if int4 else (0, 0, 0)),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1),
        *p_strides, *l_strides,
        FMT=FMT_IDS[kv.fmt], GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_HALF=triton.next_power_of_2(half), BLOCK_N=cfg.block_n,
        DIRECT_OUT=direct, BLOCK_GM=block_gm, BLOCK_S=block_s, BLOCK_D=block_d,
        CHUNK_S=min(block_s, max(2, 128 * 32 * cfg.num_warps // (block_d * block_gm))),
        DOT_DTYPE=_dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------
# extend
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantExtendConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_quant_extend_config(fmt: str, page_size: int, device: torch.device) -> QuantExtendConfig:
    if device.type != "cuda":
        return QuantExtendConfig(block_m=16, block_n=min(16, page_size), num_warps=4, num_stages=1)
    if fmt == "int4":  # unpacked nibbles and the folded q need more registers: 8 warps (4 spill, ptxas sm_90)
        return QuantExtendConfig(block_m=64, block_n=64 if page_size >= 64 else 32, num_warps=8, num_stages=2)
    return QuantExtendConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)


@triton.jit
def _quant_extend_kernel(
    Q, KQ, VQ, KS, VS, KZ, KT, VT, KNew, VNew, BlockTables, ContextLens, QueryStartLoc, TailSlots, Out,
    qk_scale, num_m_blocks, HALF,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_ksb, stride_kst, stride_ksh, stride_kzd,
    stride_vsb, stride_vst, stride_vsh,
    stride_tn, stride_tt, stride_th,
    stride_nt, stride_nh,
    stride_btb, stride_btn,
    stride_ot, stride_oh,
    FMT: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (query head, sequence, query tile), the query tiles last-first (the longest start first).

    Keys in three parts: the cached prefix's quantized tokens, int4's tail part of the prefix (full
    precision), then the step's new tokens from KNew/VNew (full precision, causal among themselves).
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
    if FMT == 2:
        full = tl.minimum((context_len // PAGE_SIZE) * PAGE_SIZE, prefix)
    else:
        full = prefix
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_HALF)
    m_mask = offs_m < q_len
    qmask = m_mask[:, None] & (offs_c < HALF)[None, :]
    rows = (q_row0 + offs_m).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qt + head * stride_qh + offs_c[None, :]
    q32_lo = tl.load(q_ptrs, mask=qmask, other=0.0).to(tl.float32)
    q32_hi = tl.load(q_ptrs + HALF, mask=qmask, other=0.0).to(tl.float32)
    q_lo, q_hi = q32_lo.to(DOT_DTYPE), q32_hi.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    table = BlockTables + b.to(tl.int64) * stride_btb
    # 1. the cached prefix, quantized (every query of the tile sees all of it)
    acc_lo, acc_hi, m_i, l_i = _quant_range(
        acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, q32_lo, q32_hi,
        KQ + kv_head * stride_kh, VQ + kv_head * stride_kh, KS + kv_head * stride_ksh, VS + kv_head * stride_vsh,
        KZ + kv_head * stride_ksh, table, 0, full, qk_scale,
        stride_kb, stride_kt, stride_ksb, stride_kst, stride_kzd, stride_vsb, stride_vst, stride_btn, HALF,
        FMT, PAGE_SIZE, BLOCK_N, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION, False,
    )  # fmt: skip
    # 2. int4: the prefix's tokens still in the tail
    if FMT == 2:
        slot = tl.maximum(tl.load(TailSlots + b), 0).to(tl.int64)
        tail = slot * stride_tn + kv_head * stride_th
        acc_lo, acc_hi, m_i, l_i = _tail_range(
            acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, KT + tail, VT + tail, full, prefix, full,
            qk_scale, stride_tt, HALF, BLOCK_N, BLOCK_HALF, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    # 3. the new tokens: causal; the tiles before this query tile are fully visible
    k_new = KNew + q_row0.to(tl.int64) * stride_nt + kv_head * stride_nh
    v_new = VNew + q_row0.to(tl.int64) * stride_nt + kv_head * stride_nh
    new_end = tl.minimum(q_len, m_start + BLOCK_M)
    for j0 in range(0, new_end, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_mask = offs_j < q_len
        s = _rows_scores(q_lo, q_hi, k_new, offs_j.to(tl.int64), j_mask, stride_nt, HALF, BLOCK_HALF, DOT_DTYPE,
                         DOT_PRECISION) * qk_scale  # fmt: skip
        s = tl.where((offs_j[None, :] <= offs_m[:, None]) & j_mask[None, :], s, float("-inf"))
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i, True)
        acc_lo, acc_hi = _rows_accumulate(p, acc_lo * alpha[:, None], acc_hi * alpha[:, None], v_new,
                                          offs_j.to(tl.int64), j_mask, stride_nt, HALF, BLOCK_HALF, DOT_DTYPE,
                                          DOT_PRECISION)  # fmt: skip

    inv = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    o_ptrs = Out + rows[:, None] * stride_ot + head * stride_oh + offs_c[None, :]
    tl.store(o_ptrs, (acc_lo * inv[:, None]).to(Out.dtype.element_ty), mask=qmask)
    tl.store(o_ptrs + HALF, (acc_hi * inv[:, None]).to(Out.dtype.element_ty), mask=qmask)


def quant_extend_attention_triton(
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
    max_query_len: int | None = None,
    config: QuantExtendConfig | None = None,
) -> torch.Tensor:
    """Triton twin of ``quant_extend_attention_ref``; ``max_query_len`` sizes the grid without a GPU sync."""
    total_q, num_heads, head_dim = q.shape
    batch = context_lens.shape[0]
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or default_quant_extend_config(kv.fmt, kv.block_size, q.device)
    out = torch.empty_like(q)
    if total_q == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    num_m_blocks = triton.cdiv(max_query_len, cfg.block_m)
    k_tail, v_tail, k_zero = _tail_tensors(kv, q)
    tails = tail_slots if tail_slots is not None else context_lens
    int4 = kv.fmt == "int4"
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    _quant_extend_kernel[(num_heads, batch, num_m_blocks)](
        q, _data(kv.k), _data(kv.v), kv.k_scale, kv.v_scale, k_zero, k_tail, v_tail, k_new, v_new, block_tables,
        context_lens.contiguous(), query_start_loc.contiguous(), tails, out,
        scale * LOG2E, num_m_blocks, head_dim // 2,
        q.stride(0), q.stride(1),
        kv.k.stride(0), kv.k.stride(1), kv.k.stride(2),
        kv.k_scale.stride(0), 0 if int4 else kv.k_scale.stride(1), kv.k_scale.stride(1) if int4 else kv.k_scale.stride(2),
        kv.k_scale.stride(2) if int4 else 0,
        kv.v_scale.stride(0), kv.v_scale.stride(1), kv.v_scale.stride(2),
        *(k_tail.stride()[:3] if int4 else (0, 0, 0)),
        k_new.stride(0), k_new.stride(1),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1),
        FMT=FMT_IDS[kv.fmt], GROUP=num_heads // kv.num_heads, PAGE_SIZE=kv.block_size,
        BLOCK_M=cfg.block_m, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), BLOCK_N=cfg.block_n,
        DOT_DTYPE=_dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
