"""Quantized KV formats and the plain-PyTorch references of their kernels (lesson 03).

Three formats, chosen by measurements on nexus-tiny's own K/V (course/03_quantized_kv_cache.ipynb):

* ``"int8"``: symmetric int8 per (token, KV head). The scale is a power of two, ``2^e`` with ``e`` stored as
  one int8 (OCP Microscaling's E8M0 idea): the smallest power of two with ``max|x| <= 127 * 2^e``. One
  byte of metadata per 32..128 values keeps int8 at 1.94x (D=32) / 1.98x (D=128) fewer bytes than bf16.
* ``"fp8"``: float8 e4m3 per (token, KV head) with the same power-of-two scale (``max|x| <= 448 * 2^e``):
  the layout, and the kernels, of int8 with a different element type.
* ``"int4"`` (KIVI): keys per *channel*, asymmetric, over the tokens of one block (the block is the group:
  fp16 scale and minimum per (block, head, channel)); values per token, symmetric, one fp16 scale per
  (token, head). Two values per byte: byte ``j`` of a row holds channel ``j`` (low nibble) and channel
  ``j + D/2`` (high nibble). A block is quantized when it fills; until then its tokens stay in full
  precision in a small *tail* pool (KIVI's residual window, one block per sequence).

Storage of one layer is a `QuantizedKV`: the blocks and, indexed by the same block ids, their scales.
Rounding is round-half-to-even everywhere (``torch.round``; the Triton kernels do the same), and every
division by a power-of-two scale is exact, so the kernels reproduce these functions bit for bit.

The references gather and dequantize each sequence into a float copy and run `reference._attend`; the
Triton kernels (``quant_write.py``, ``quant_attention.py``) read the same bytes and dequantize in
registers instead. No argument checking here: ``quant.py`` checks once, then calls either side.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .reference import _attend, gather_kv, prefill_visibility

FORMATS = ("int8", "fp8", "int4")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest float8 e4m3fn value
INT4_K_LEVELS = 15  # keys: 0..15 over [min, max] of a channel in a block
INT4_V_MAX = 7  # values: -7..7 times the (token, head) scale, stored + 8
SCALE_EXP_MIN = -126  # 2^e stays a normal float32


@dataclass
class QuantizedKV:
    """One layer's quantized K/V pool; every tensor's first index is the block id (tails: the tail slot).

    int8 / fp8: ``k, v [NB, BS, H, D]`` (int8 / float8_e4m3fn); ``k_scale, v_scale [NB, BS, H]`` int8
    exponents (scale = 2^e).
    int4: ``k, v [NB, BS, H, D/2]`` uint8 (two values per byte); ``k_scale, k_zero [NB, H, D]`` fp16 (per
    block and channel: x = q * scale + zero); ``v_scale [NB, BS, H]`` fp16 (x = (q - 8) * scale);
    ``k_tail, v_tail [NT, BS, H, D]`` in the compute dtype: the blocks still being filled.
    """

    fmt: str
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_zero: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * (2 if self.fmt == "int4" else 1)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def clone(self) -> QuantizedKV:
        return replace(self, **{k: t.clone() for k, t in self.tensors().items()})


def empty_quantized_kv(fmt: str, num_blocks: int, block_size: int, num_heads: int, head_dim: int, *,
                       dtype: torch.dtype = torch.float32, device=None, num_tail: int = 0) -> QuantizedKV:
    """Zeroed storage for one layer (the cache stacks layers along a leading dimension instead)."""
    shape = (num_blocks, block_size, num_heads, head_dim)
    if fmt in ("int8", "fp8"):
        elem = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        return QuantizedKV(fmt, torch.zeros(shape, dtype=elem, device=device), torch.zeros(shape, dtype=elem, device=device),
                           torch.zeros(shape[:3], dtype=torch.int8, device=device),
                           torch.zeros(shape[:3], dtype=torch.int8, device=device))  # fmt: skip
    packed = (*shape[:3], head_dim // 2)
    tail = (num_tail, block_size, num_heads, head_dim)
    return QuantizedKV(
        fmt, torch.zeros(packed, dtype=torch.uint8, device=device), torch.zeros(packed, dtype=torch.uint8, device=device),
        torch.zeros(num_blocks, num_heads, head_dim, dtype=torch.float16, device=device),
        torch.zeros(shape[:3], dtype=torch.float16, device=device),
        k_zero=torch.zeros(num_blocks, num_heads, head_dim, dtype=torch.float16, device=device),
        k_tail=torch.zeros(tail, dtype=dtype, device=device), v_tail=torch.zeros(tail, dtype=dtype, device=device),
    )  # fmt: skip


def bytes_per_token(fmt: str, num_heads: int, head_dim: int, block_size: int = 16, elem_bytes: int = 2) -> float:
    """Bytes one token takes in one layer's K and V, scales included (``"auto"``: ``elem_bytes`` each).

    int4's per-block key scales are shared by the block's tokens; its tail (one block per live sequence
    in full precision) is per sequence, not per token, and not counted here.
    """
    h, d = num_heads, head_dim
    if fmt == "auto":
        return 2 * h * d * elem_bytes
    if fmt in ("int8", "fp8"):
        return 2 * h * (d + 1)
    if fmt == "int4":
        return h * (d / 2 + 4 * d / block_size) + h * (d / 2 + 2)
    raise ValueError(f"unknown format {fmt!r}")


# ----------------------------------------------------------------------------------------------------------
# the formats: quantize / dequantize
# ----------------------------------------------------------------------------------------------------------


def pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest integer e with amax <= qmax * 2^e, exactly (no log2): int32, >= SCALE_EXP_MIN.

    With amax = m * 2^E (1 <= m < 2) and qmax = c * 2^Q (1 <= c < 2): e = E - Q, plus one when m > c.
    """
    amax = amax.float()
    _, ex = torch.frexp(amax)  # amax = f * 2^ex, 0.5 <= f < 1
    big_e = ex - 1
    q = int(torch.tensor(qmax).log2().floor())
    e = big_e - q + (amax > torch.ldexp(torch.full_like(amax, qmax), big_e - q)).int()
    return torch.where(amax > 0, e, torch.full_like(e, SCALE_EXP_MIN)).clamp(min=SCALE_EXP_MIN)


def quantize_8bit(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q [..., D] int8 or float8_e4m3fn, e [...] int8): x ~ q * 2^e per row."""
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    e = pow2_exponent(x.float().abs().amax(-1), qmax)
    y = torch.ldexp(x.float(), -e[..., None])  # exact: a power-of-two scale
    q = y.round().to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)
    return q, e.to(torch.int8)


def dequantize_8bit(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(q.float(), e[..., None].int())


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """[..., D] levels 0..15 -> [..., D/2] uint8: byte j = level j | level (j + D/2) << 4."""
    half = levels.shape[-1] // 2
    return (levels[..., :half] | (levels[..., half:] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] uint8 -> [..., D] float levels 0..15."""
    p = packed.int()
    return torch.cat([p & 15, p >> 4], dim=-1).float()


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_k_int4(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of keys [BS, H, D] -> (packed [BS, H, D/2], scale [H, D], zero [H, D]) per channel.

    scale = (max - min) / 15 and zero = min over the block's tokens, both rounded to fp16 first; the
    levels are computed against the rounded values, so dequantization sees exactly what was used.
    """
    kf = k.float()
    lo, hi = kf.amin(0), kf.amax(0)
    scale = ((hi - lo) / INT4_K_LEVELS).half()
    zero = lo.half()
    levels = ((kf - zero.float()) / _safe(scale.float())).round().clamp(0, INT4_K_LEVELS)
    return pack_int4(levels.int()), scale, zero


def dequantize_k_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return unpack_int4(packed) * scale.float() + zero.float()


def quantize_v_int4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [..., D] -> (packed [..., D/2], scale [...] fp16) per row: x ~ (q - 8) * scale."""
    vf = v.float()
    scale = (vf.abs().amax(-1) / INT4_V_MAX).half()
    levels = (vf / _safe(scale.float())[..., None]).round().clamp(-INT4_V_MAX, INT4_V_MAX) + 8
    return pack_int4(levels.int()), scale


def dequantize_v_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (unpack_int4(packed) - 8) * scale.float()[..., None]


def quantize_dequantize(x: torch.Tensor, fmt: str, which: str = "k") -> torch.Tensor:
    """What the cache gives back for x [T, H, D] (int4 keys: T is one block), in float32."""
    if fmt in ("int8", "fp8"):
        return dequantize_8bit(*quantize_8bit(x, fmt))
    if which == "k":
        return dequantize_k_int4(*quantize_k_int4(x))
    return dequantize_v_int4(*quantize_v_int4(x))


# ----------------------------------------------------------------------------------------------------------
# kernel references
# ----------------------------------------------------------------------------------------------------------


def quant_write_kv_ref(k: torch.Tensor, v: torch.Tensor, kv: QuantizedKV, slot_mapping: torch.Tensor) -> None:
    """int8 / fp8: quantize new rows ``[N, H, D]`` into their slots (in place); slot -1 skips the row."""
    bs = kv.block_size
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // bs, slots % bs
    for x, data, exp in ((k, kv.k, kv.k_scale), (v, kv.v, kv.v_scale)):
        q, e = quantize_8bit(x[keep], kv.fmt)
        data[blocks, offsets] = q
        exp[blocks, offsets] = e


def int4_write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, kv: QuantizedKV, tail_mapping: torch.Tensor, completions: torch.Tensor
) -> None:
    """int4: new rows ``[N, H, D]`` into the pool, in place, in two steps.

    1. ``completions [C, 4]`` int32, one row per block that fills in this step: (block id, tail slot
       holding its first rows or -1, how many rows are in that tail slot, index of its first new row in
       k/v). The block's rows are gathered from the tail and the new rows, quantized and stored.
    2. ``tail_mapping [N]``: the rows of blocks still being filled go to tail slot * block_size + offset
       (-1: the row went into a completed block).
    Step 1 runs first, so a tail slot freed by a completion may be handed out again in the same step.
    """
    bs = kv.block_size
    for block, tail, n_tail, row0 in completions.tolist():
        n_new = bs - n_tail
        k_rows = torch.cat([kv.k_tail[tail, :n_tail].float() if n_tail else k.new_zeros(0, *k.shape[1:]).float(),
                            k[row0 : row0 + n_new].float()])  # fmt: skip
        v_rows = torch.cat([kv.v_tail[tail, :n_tail].float() if n_tail else v.new_zeros(0, *v.shape[1:]).float(),
                            v[row0 : row0 + n_new].float()])  # fmt: skip
        kv.k[block], kv.k_scale[block], kv.k_zero[block] = quantize_k_int4(k_rows)
        kv.v[block], kv.v_scale[block] = quantize_v_int4(v_rows)
    keep = tail_mapping >= 0
    slots = tail_mapping[keep].long()
    kv.k_tail[slots // bs, slots % bs] = k[keep].to(kv.k_tail.dtype)
    kv.v_tail[slots // bs, slots % bs] = v[keep].to(kv.v_tail.dtype)


def gather_dequantized(kv: QuantizedKV, block_table: torch.Tensor, length: int, tail_slot: int = -1,
                       quantized: int | None = None):
    """The first ``length`` tokens of one sequence as float32 ``(k, v) [length, H, D]``: a dequantized copy
    (what the kernels never make). int4: the first ``quantized`` tokens (default: those of its full blocks)
    come from the pool, the rest from tail slot ``tail_slot``, whose row 0 is the first token past the
    last full block."""
    bs = kv.block_size
    if kv.fmt in ("int8", "fp8"):
        k = dequantize_8bit(gather_kv(kv.k, block_table, length), gather_kv(kv.k_scale[..., None], block_table, length)[..., 0])
        v = dequantize_8bit(gather_kv(kv.v, block_table, length), gather_kv(kv.v_scale[..., None], block_table, length)[..., 0])
        return k, v
    n_q = (length // bs) * bs if quantized is None else quantized
    blocks = block_table[: -(-n_q // bs)].long().to(kv.device)
    k = dequantize_k_int4(kv.k[blocks], kv.k_scale[blocks][:, None], kv.k_zero[blocks][:, None]).flatten(0, 1)[:n_q]
    v = dequantize_v_int4(kv.v[blocks], kv.v_scale[blocks]).flatten(0, 1)[:n_q]
    if length > n_q:
        k = torch.cat([k, kv.k_tail[tail_slot, : length - n_q].float()])
        v = torch.cat([v, kv.v_tail[tail_slot, : length - n_q].float()])
    return k, v


def quant_decode_attention_ref(
    q: torch.Tensor,
    kv: QuantizedKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    tail_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its quantized paged context: q [B, Hq, D] -> [B, Hq, D].

    int4: ``tail_slots [B]`` names each sequence's tail slot (its tokens past ``context_len // block_size``
    full blocks; -1 when there are none).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    tails = [-1] * q.shape[0] if tail_slots is None else tail_slots.tolist()
    for b, length in enumerate(context_lens.tolist()):
        k, v = gather_dequantized(kv, block_tables[b], length, tails[b])
        out[b] = _attend(q[b : b + 1], k, v, scale, None)[0].to(q.dtype)
    return out


def quant_extend_attention_ref(
    q: torch.Tensor,
    kv: QuantizedKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
    tail_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many new tokens per sequence (packed varlen, causal), q [total_q, Hq, D] -> [total_q, Hq, D].

    The cached prefix (the first ``context_len - q_len`` tokens) is read from the quantized pool; the new
    tokens' keys and values from ``k_new, v_new [total_q, H, D]`` in full precision (SGLang's extend, and
    KIVI's prefill: a step's own tokens are never seen quantized by that step).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    tails = [-1] * context_lens.shape[0] if tail_slots is None else tail_slots.tolist()
    for b, length in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        prefix = length - (hi - lo)
        k, v = _prefix_dequantized(kv, block_tables[b], prefix, length, tails[b])
        k = torch.cat([k, k_new[lo:hi].float()])
        v = torch.cat([v, v_new[lo:hi].float()])
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, prefill_visibility(hi - lo, length, device=q.device)).to(q.dtype)
    return out


def _prefix_dequantized(kv: QuantizedKV, table: torch.Tensor, prefix: int, length: int, tail_slot: int):
    """The first ``prefix`` tokens as the pool holds them after this step's write: int4 blocks that are
    full once the step's ``length`` tokens are in are quantized; the tokens past them are in the tail."""
    if kv.fmt != "int4":
        return gather_dequantized(kv, table, prefix)
    full = (length // kv.block_size) * kv.block_size
    return gather_dequantized(kv, table, prefix, tail_slot, quantized=min(prefix, full))
