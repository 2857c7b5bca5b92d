"""Triton quantize-on-write kernels for the quantized KV formats (twins of ``quant_reference.py``).

* int8 / fp8: one program per new token quantizes its [H, D] key and value rows (one power-of-two scale
  per head) and stores them in their slots.
* int4: one program per (block that fills in this step, head) gathers the block's rows (the first ones
  from its tail slot, the rest from the step's new rows), quantizes keys per channel and values per
  token, and stores the packed block; then lesson 02's write kernel copies the rows of blocks still being
  filled into their tail slots.

Bit-exact with the references: rounding is round-half-to-even through the float32 "magic number"
(adding 1.5 * 2^23 leaves the integer part in the mantissa), scales that are powers of two are built
from their exponent bits, and divisions by fp16 scales use ``div_rn`` (IEEE, like torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .write import write_kv_cache_triton
from .quant_reference import FP8_MAX, INT4_K_LEVELS, INT4_V_MAX, INT8_MAX, SCALE_EXP_MIN, QuantizedKV

# Globals a @triton.jit function reads must be constexpr.
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + M - M rounds x (|x| < 2^22) to an integer, half to even
_FP8_MAX = tl.constexpr(FP8_MAX)
_INT8_MAX = tl.constexpr(INT8_MAX)
_K_LEVELS = tl.constexpr(float(INT4_K_LEVELS))
_V_MAX = tl.constexpr(float(INT4_V_MAX))
_EXP_MIN = tl.constexpr(SCALE_EXP_MIN)


@triton.jit
def _rint(x):
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def _pow2(e):
    """2^e as float32 for integer tensors e in [-126, 127], exactly (from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(x):
    """floor(log2 |x|) for normal float32 x (-127 for zero), read from the bits."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _scale_exponent(amax, QMAX: tl.constexpr, QMAX_EXP: tl.constexpr):
    """The smallest e with amax <= QMAX * 2^e (QMAX = c * 2^QMAX_EXP, 1 <= c < 2); SCALE_EXP_MIN for 0."""
    big = _exponent(amax) - QMAX_EXP
    e = big + (amax > QMAX * _pow2(tl.maximum(big, -126))).to(tl.int32)
    return tl.where(amax > 0.0, tl.maximum(e, _EXP_MIN), _EXP_MIN)


@triton.jit
def _round_e4m3(y):
    """Round float32 y (|y| <= 448) to the nearest float8 e4m3 value, ties to even: spacing 2^(E-3) in
    binade E, 2^-9 among the subnormals (E < -6). A negative value that rounds to zero stays -0."""
    quantum = tl.maximum(_exponent(y), -6) - 3
    r = _rint(tl.abs(y) * _pow2(-quantum)) * _pow2(quantum)
    return tl.where(y < 0.0, -r, r)


@triton.jit
def _quantize_rows(x, IS_FP8: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] float32 (one token's heads) -> (values to store, int8 exponents [BLOCK_H])."""
    amax = tl.max(tl.abs(x), 1)
    if IS_FP8:
        e = _scale_exponent(amax, _FP8_MAX, 8)
    else:
        e = _scale_exponent(amax, _INT8_MAX, 6)
    y = x * _pow2(-e)[:, None]  # exact
    if IS_FP8:
        q = _round_e4m3(y)
    else:
        q = _rint(y)
    return q, e


@triton.jit
def _quant_write_kernel(
    K, V, KQ, VQ, KS, VS, SlotMapping,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_qb, stride_qt, stride_qh, stride_sb, stride_st,
    num_heads, head_dim,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    """One program per new token: quantize its key and value rows; slot -1 stores nothing."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + token).to(tl.int64)
    safe = tl.maximum(slot, 0)
    block = safe // PAGE_SIZE
    offset = safe % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    keep = (tl.zeros([BLOCK_H], tl.int64) + slot) >= 0  # a vector: the interpreter cannot broadcast a scalar mask
    h_mask = (offs_h < num_heads) & keep
    mask = h_mask[:, None] & (offs_d[None, :] < head_dim)
    k = tl.load(K + token * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(V + token * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    data = block * stride_qb + offset * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
    scales = block * stride_sb + offset * stride_st + offs_h
    qk, ek = _quantize_rows(k.to(tl.float32), IS_FP8)
    qv, ev = _quantize_rows(v.to(tl.float32), IS_FP8)
    tl.store(KQ + data, qk.to(KQ.dtype.element_ty), mask=mask)
    tl.store(VQ + data, qv.to(VQ.dtype.element_ty), mask=mask)
    tl.store(KS + scales, ek.to(tl.int8), mask=h_mask)
    tl.store(VS + scales, ev.to(tl.int8), mask=h_mask)


def quant_write_kv_triton(k: torch.Tensor, v: torch.Tensor, kv: QuantizedKV, slot_mapping: torch.Tensor) -> None:
    """Triton twin of ``quant_write_kv_ref`` (int8 / fp8)."""
    n, num_heads, head_dim = k.shape
    if n == 0:
        return
    k, v = k.contiguous(), v.contiguous()
    _quant_write_kernel[(n,)](
        k, v, kv.k, kv.v, kv.k_scale, kv.v_scale, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.k.stride(0), kv.k.stride(1), kv.k.stride(2), kv.k_scale.stride(0), kv.k_scale.stride(1),
        num_heads, head_dim,
        PAGE_SIZE=kv.block_size, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), IS_FP8=kv.fmt == "fp8", num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# int4: complete the blocks that fill in this step
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _block_rows(Tail, New, tail_slot, n_tail, row0, head, offs_t, col, cmask,
                stride_tt, stride_tb, stride_th, stride_nn, stride_nh):  # fmt: skip
    """Rows 0..PAGE-1 of a block, columns ``col`` (float32): the first n_tail from the tail slot, the rest
    from the new rows starting at row0."""
    from_tail = offs_t < n_tail
    safe_tail = tl.maximum(tail_slot, 0).to(tl.int64)
    t = tl.load(Tail + safe_tail * stride_tt + offs_t[:, None] * stride_tb + head * stride_th + col[None, :],
                mask=from_tail[:, None] & cmask[None, :], other=0.0)  # fmt: skip
    new_row = (row0 + offs_t - n_tail).to(tl.int64)
    x = tl.load(New + new_row[:, None] * stride_nn + head * stride_nh + col[None, :],
                mask=(~from_tail)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
    return tl.where(from_tail[:, None], t.to(tl.float32), x.to(tl.float32))


@triton.jit
def _key_levels(x, Scale, Zero, offs_c, c_mask, t_mask):
    """Keys [BLOCK_T, BLOCK_HALF] of one block -> int32 levels 0..15 per channel; stores the fp16 scale
    (max - min) / 15 and zero (min) of each channel, and quantizes against those rounded values."""
    lo = tl.min(tl.where(t_mask[:, None], x, float("inf")), 0)
    hi = tl.max(tl.where(t_mask[:, None], x, float("-inf")), 0)
    scale = tl.math.div_rn(hi - lo, 15.0).to(tl.float16)
    zero = lo.to(tl.float16)
    tl.store(Scale + offs_c, scale, mask=c_mask)
    tl.store(Zero + offs_c, zero, mask=c_mask)
    s = scale.to(tl.float32)
    safe = tl.where(s > 0.0, s, 1.0)
    levels = _rint(tl.math.div_rn(x - zero.to(tl.float32)[None, :], safe[None, :]))
    return tl.minimum(tl.maximum(levels, 0.0), _K_LEVELS).to(tl.int32)


@triton.jit
def _int4_complete_kernel(
    K, V, KTail, VTail, KQ, VQ, KS, KZ, VS, Completions,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_tt, stride_tb, stride_th,
    stride_qb, stride_qt, stride_qh, stride_mb, stride_mh, stride_vsb, stride_vst,
    HALF, PAGE_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Program (completion, head): quantize one full block of one head. Columns come in two halves,
    [0, D/2) and [D/2, D): the low and high nibbles of the packed bytes."""
    c = tl.program_id(0)
    head = tl.program_id(1)
    block = tl.load(Completions + c * 4).to(tl.int64)
    tail_slot = tl.load(Completions + c * 4 + 1)
    n_tail = tl.load(Completions + c * 4 + 2)
    row0 = tl.load(Completions + c * 4 + 3)
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_HALF)
    t_mask = offs_t < PAGE_SIZE
    c_mask = offs_c < HALF
    mask = t_mask[:, None] & c_mask[None, :]
    k_lo = _block_rows(KTail, K, tail_slot, n_tail, row0, head, offs_t, offs_c, c_mask,
                       stride_tt, stride_tb, stride_th, stride_kn, stride_kh)
    k_hi = _block_rows(KTail, K, tail_slot, n_tail, row0, head, offs_t, offs_c + HALF, c_mask,
                       stride_tt, stride_tb, stride_th, stride_kn, stride_kh)
    v_lo = _block_rows(VTail, V, tail_slot, n_tail, row0, head, offs_t, offs_c, c_mask,
                       stride_tt, stride_tb, stride_th, stride_vn, stride_vh)
    v_hi = _block_rows(VTail, V, tail_slot, n_tail, row0, head, offs_t, offs_c + HALF, c_mask,
                       stride_tt, stride_tb, stride_th, stride_vn, stride_vh)

    # keys: per channel over the block's tokens; the low half of the channels in the low nibbles
    meta = block * stride_mb + head * stride_mh
    lo_levels = _key_levels(k_lo, KS + meta, KZ + meta, offs_c, c_mask, t_mask)
    hi_levels = _key_levels(k_hi, KS + meta + HALF, KZ + meta + HALF, offs_c, c_mask, t_mask)
    rows = block * stride_qb + offs_t[:, None] * stride_qt + head * stride_qh + offs_c[None, :]
    tl.store(KQ + rows, (lo_levels | (hi_levels << 4)).to(tl.uint8), mask=mask)

    # values: per token, symmetric
    amax = tl.maximum(tl.max(tl.abs(v_lo), 1), tl.max(tl.abs(v_hi), 1))
    vscale = tl.math.div_rn(amax, _V_MAX).to(tl.float16)
    tl.store(VS + block * stride_vsb + offs_t * stride_vst + head, vscale, mask=t_mask)
    vs = vscale.to(tl.float32)
    vsafe = tl.where(vs > 0.0, vs, 1.0)[:, None]
    lo_levels = tl.minimum(tl.maximum(_rint(tl.math.div_rn(v_lo, vsafe)), -_V_MAX), _V_MAX) + 8
    hi_levels = tl.minimum(tl.maximum(_rint(tl.math.div_rn(v_hi, vsafe)), -_V_MAX), _V_MAX) + 8
    vpacked = lo_levels.to(tl.int32) | (hi_levels.to(tl.int32) << 4)
    tl.store(VQ + rows, vpacked.to(tl.uint8), mask=mask)


def int4_write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, kv: QuantizedKV, tail_mapping: torch.Tensor, completions: torch.Tensor
) -> None:
    """Triton twin of ``int4_write_kv_ref``: complete the filled blocks, then copy the rest to the tails."""
    n, num_heads, head_dim = k.shape
    k, v = k.contiguous(), v.contiguous()
    if completions.shape[0]:
        half = head_dim // 2
        _int4_complete_kernel[(completions.shape[0], num_heads)](
            k, v, kv.k_tail, kv.v_tail, kv.k, kv.v, kv.k_scale, kv.k_zero, kv.v_scale, completions.contiguous(),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kv.k_tail.stride(0), kv.k_tail.stride(1), kv.k_tail.stride(2),
            kv.k.stride(0), kv.k.stride(1), kv.k.stride(2), kv.k_scale.stride(0), kv.k_scale.stride(1),
            kv.v_scale.stride(0), kv.v_scale.stride(1),
            half, PAGE_SIZE=kv.block_size, BLOCK_T=triton.next_power_of_2(kv.block_size),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    if n:
        write_kv_cache_triton(k, v, kv.k_tail, kv.v_tail, tail_mapping)
