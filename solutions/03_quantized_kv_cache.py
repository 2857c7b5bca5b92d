"""Reference solutions to the exercises of lesson 03 (`course/03_quantized_kv_cache.ipynb`).

Each function has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson03` holds
the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove every
checker rejects them (they are also the lesson's "common pitfalls", written as code).

The Triton kernel is defined with TRITON_INTERPRET=1 when there is no GPU (as the notebook's first cell
does), and the environment is put back afterwards so importing this file changes nothing else.
"""

from __future__ import annotations

import os

import torch

_saved = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _int4_scores_kernel(Q, Packed, Scale, Zero, Out, n, HALF: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program i: scores of keys [i * BLOCK_N, (i + 1) * BLOCK_N)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, HALF)
        n_mask = offs_n < n
        b = tl.load(Packed + offs_n[:, None] * HALF + offs_c[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
        lo = (b & 15).to(tl.float32) * tl.load(Scale + offs_c)[None, :] + tl.load(Zero + offs_c)[None, :]
        hi = (b >> 4).to(tl.float32) * tl.load(Scale + HALF + offs_c)[None, :] + tl.load(Zero + HALF + offs_c)[None, :]
        s = tl.sum(lo * tl.load(Q + offs_c)[None, :], 1) + tl.sum(hi * tl.load(Q + HALF + offs_c)[None, :], 1)
        tl.store(Out + offs_n, s, mask=n_mask)
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved


def quantize_int8(x):
    """Symmetric int8 per row with a power-of-two scale: x ~ q * 2^e."""
    amax = x.float().abs().amax(-1)
    e = torch.ceil(torch.log2(amax / 127)).clamp(min=-126)
    e = torch.where(amax > 0, e, torch.full_like(e, -126))
    e = e + (amax > 127 * torch.exp2(e)).float()  # log2 rounding can leave e one short
    q = torch.round(x.float() * torch.exp2(-e)[..., None]).clamp(-127, 127).to(torch.int8)
    return q, e.to(torch.int32)


def quantize_keys_per_channel(k):
    """KIVI's keys: one block [T, H, D], 16 levels per channel over the tokens."""
    lo, hi = k.amin(0), k.amax(0)
    scale = (hi - lo) / 15
    levels = torch.round((k - lo) / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, 15)
    return levels.to(torch.uint8), scale, lo


def int4_scores(q, packed, scale, zero):
    """q [D], packed [N, D/2] uint8, scale / zero [D] -> scores [N] = q . (level * scale + zero)."""
    n, half = packed.shape
    out = torch.empty(n, device=q.device, dtype=torch.float32)
    block_n = 32
    _int4_scores_kernel[(triton.cdiv(n, block_n),)](q.float().contiguous(), packed.contiguous(), scale.float().contiguous(),
                                                     zero.float().contiguous(), out, n, HALF=half, BLOCK_N=block_n)  # fmt: skip
    return out


# --- wrong answers the checkers must catch ----------------------------------------------------------------


def quantize_int8_truncates(x):
    """Converts to int8 without rounding: errors up to a whole step."""
    q, e = quantize_int8(x)
    return (x.float() * torch.exp2(-e.float())[..., None]).clamp(-127, 127).to(torch.int8), e


def quantize_int8_per_tensor(x):
    """One scale for the whole tensor: rows with small values get a scale far too coarse for them."""
    amax = x.float().abs().amax()
    e = torch.ceil(torch.log2(amax / 127)).expand(x.shape[:-1])
    return torch.round(x.float() * torch.exp2(-e)[..., None]).clamp(-127, 127).to(torch.int8), e.to(torch.int32)


def quantize_int8_floor(x):
    """floor(log2(max / 127)): one step too fine, the largest values clip at 127."""
    amax = x.float().abs().amax(-1).clamp(min=1e-30)
    e = torch.floor(torch.log2(amax / 127))
    return torch.round(x.float() * torch.exp2(-e)[..., None]).clamp(-127, 127).to(torch.int8), e.to(torch.int32)


def keys_per_token(k):
    """Quantizes each token over its channels: the outlier channels set every token's step."""
    lo, hi = k.amin(-1), k.amax(-1)
    scale = (hi - lo) / 15
    levels = torch.round((k - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return levels.to(torch.uint8), scale, lo


def keys_symmetric(k):
    """No zero point: a channel offset to 6 +- 10 wastes half its levels on values that never occur."""
    amax = k.abs().amax(0)
    scale = amax / 7
    levels = torch.round(k / scale).clamp(-7, 7) + 8
    return levels.to(torch.uint8), scale, -8 * scale


def keys_sixteen_steps(k):
    """scale = (max - min) / 16: the largest key needs level 16, which 4 bits cannot hold."""
    lo, hi = k.amin(0), k.amax(0)
    scale = (hi - lo) / 16
    return torch.round((k - lo) / scale).clamp(0, 15).to(torch.uint8), scale, lo


def int4_scores_swapped_nibbles(q, packed, scale, zero):
    p = packed.long()
    k = torch.cat([p >> 4, p & 15], -1).float() * scale + zero
    return k @ q


def int4_scores_no_zero(q, packed, scale, zero):
    p = packed.long()
    return (torch.cat([p & 15, p >> 4], -1).float() * scale) @ q


def int4_scores_interleaved(q, packed, scale, zero):
    """Reads byte j as channels 2j and 2j + 1 (another common packing), not j and j + D/2."""
    p = packed.long()
    levels = torch.stack([p & 15, p >> 4], -1).flatten(-2).float()
    return (levels * scale + zero) @ q


MISTAKES = {
    "quantize_int8": [quantize_int8_truncates, quantize_int8_per_tensor, quantize_int8_floor],
    "quantize_keys_per_channel": [keys_per_token, keys_symmetric, keys_sixteen_steps],
    "int4_scores": [int4_scores_swapped_nibbles, int4_scores_no_zero, int4_scores_interleaved],
}
