"""Checkers for lesson 03 (the quantized KV cache). Solutions: `solutions/03_quantized_kv_cache.py`.

1. `quantize_int8(x)`: symmetric int8 per row with a power-of-two scale: (q int8 [..., D], e ints [...]),
   x ~ q * 2^e, e the smallest that fits max|x| in 127 steps.
2. `quantize_keys_per_channel(k)`: KIVI's keys, one block [T, H, D] -> (levels 0..15 [T, H, D], scale
   [H, D], zero [H, D]), k ~ levels * scale + zero per channel.
3. `int4_scores(q, packed, scale, zero)`: a Triton kernel that reads packed int4 keys (byte j: channel j in
   the low nibble, channel j + D/2 in the high one), dequantizes them in registers and returns the scores
   q . k for every key; checked under the interpreter on a CPU.
"""

from __future__ import annotations

import torch

from . import (
    ExerciseFailure,
    awkward_length,
    checker,
    describe,
    expect,
    expect_close,
    expect_shape,
    expect_tensor,
)

__all__ = ["check_int4_scores", "check_quantize_int8", "check_quantize_keys_per_channel"]


def _keys(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Signed values with a few outlier channels (10x larger, offset): what real keys look like."""
    x = torch.randn(*shape, generator=g)
    d = shape[-1]
    idx = torch.randperm(d, generator=g)[: max(1, d // 8)]
    x[..., idx] = x[..., idx] * 10 + 6
    return x


# --- 1. int8 with a power-of-two scale -------------------------------------------------------------------


def _unpack_pair(out, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ExerciseFailure(f"{what} should return a pair (q, e), got {describe(out)}.")
    return expect_tensor(out[0], f"q from {what}"), expect_tensor(out[1], f"e from {what}")


@checker("quantize_int8")
def check_quantize_int8(fn):
    """Random signed rows (outlier channels, an all-zero row, widths that are not powers of two, bf16 too):
    q must be int8 in [-127, 127], e integers, every value within half a step 2^e of x, and e the smallest
    exponent with max|x| <= 127 * 2^e in every row."""
    g = torch.Generator().manual_seed(301)
    cases = [(5, 3, 32, torch.float32), (7, 24, None, torch.float32), (4, 2, 40, torch.bfloat16), (1, 1, 16, torch.float32)]
    for a, b, c, dtype in cases:
        shape = (a, b) if c is None else (a, b, c)
        x = (_keys(g, *shape) * torch.rand(*shape[:-1], 1, generator=g) * 4).to(dtype)
        x[0] = 0  # a row of zeros: any exponent works, but nothing may blow up
        what = f"quantize_int8(x of shape {list(shape)}, {dtype})"
        q, e = _unpack_pair(fn(x.clone()), what)
        expect_shape(q, shape, f"q from {what}")
        expect_shape(e, shape[:-1], f"e from {what}")
        expect(q.dtype == torch.int8, f"q from {what} should be torch.int8, got {q.dtype}.")
        expect(not e.is_floating_point() or bool((e == e.round()).all()),
               f"e from {what} must hold integer exponents (scale = 2^e): got {e.flatten()[:4].tolist()} ...")  # fmt: skip
        expect(int(q.min()) >= -127, f"q from {what} holds -128: keep it symmetric, in [-127, 127].")
        e = e.double()
        step = torch.exp2(e)
        amax = x.double().abs().amax(-1)
        back = q.double() * step[..., None]
        err = (back - x.double()).abs()
        bad = err > step[..., None] / 2 * (1 + 1e-6)
        if bool(bad.any()):
            hint = ""
            if bool((err < step[..., None]).all()):
                hint = " The error is below one step but above half of one: round to the nearest level, don't truncate."
            elif bool((amax > 127 * step).any()):
                hint = (" Some rows need more than 127 steps: their values were clipped. e must be the smallest integer with"
                        " max|x| <= 127 * 2^e: ceil(log2(max|x| / 127)), not floor.")  # fmt: skip
            raise ExerciseFailure(f"{what}: {int(bad.sum())} values are off by more than half a step (max error "
                                  f"{float((err - step[..., None] / 2).max()):.3g} over).{hint}")  # fmt: skip
        nonzero = amax > 0
        loose = nonzero & (amax <= 63.5 * step)
        expect(not bool(loose.any()),
               f"{what}: in {int(loose.sum())} row(s) the scale is larger than it needs to be (max|x| fits in 63 "
               "steps of 2^e, so 2^(e-1) would do and halve the error). Use one scale per row (per token and head), "
               "the smallest power of two that holds the row's max.")  # fmt: skip
    return f"{len(cases)} tensors (outlier channels, a zero row, D = 16 to 40, float32 and bfloat16)"


# --- 2. KIVI keys: per channel over a block -----------------------------------------------------------------


def _triple(out, what: str):
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ExerciseFailure(f"{what} should return (levels, scale, zero), got {describe(out)}.")
    return [expect_tensor(t, f"{name} from {what}") for t, name in zip(out, ("levels", "scale", "zero"))]


@checker("quantize_keys_per_channel")
def check_quantize_keys_per_channel(fn):
    """Blocks of keys with offset outlier channels: 16 levels per channel over the block's tokens, the
    channel's minimum as the zero point; every key within half a step of the channel's own step."""
    g = torch.Generator().manual_seed(302)
    for tokens, heads, dim in ((16, 2, 32), (13, 1, 24), (64, 4, 16), (5, 3, 8)):
        k = _keys(g, tokens, heads, dim)
        what = f"quantize_keys_per_channel(k of shape {[tokens, heads, dim]})"
        levels, scale, zero = _triple(fn(k.clone()), what)
        expect_shape(levels, (tokens, heads, dim), f"levels from {what}")
        if tuple(scale.shape) == (tokens, heads):
            raise ExerciseFailure(f"scale from {what} has shape {list(scale.shape)}: one per token. KIVI quantizes keys "
                                  "per channel: reduce over the tokens (dim 0), one scale per (head, channel).")  # fmt: skip
        expect_shape(scale, (heads, dim), f"scale from {what}")
        expect_shape(zero, (heads, dim), f"zero from {what}")
        lv = levels.double()
        expect(bool((lv == lv.round()).all()) and float(lv.min()) >= 0 and float(lv.max()) <= 15,
               f"levels from {what} must be integers in 0..15 (4 bits), got {float(lv.min())} .. {float(lv.max())}.")  # fmt: skip
        step = (k.amax(0) - k.amin(0)).double() / 15
        expect_close(scale.double(), step, f"scale from {what}", atol=1e-5, rtol=1e-4,
                     hint="scale = (max - min) / 15 over the block's tokens: 16 levels span 15 steps.")  # fmt: skip
        expect_close(zero.double(), k.amin(0).double(), f"zero from {what}", atol=1e-5, rtol=1e-5,
                     hint="the zero point is the channel's minimum, so level 0 is the smallest key.")  # fmt: skip
        back = lv * scale.double() + zero.double()
        err = (back - k.double()).abs()
        bad = err > step / 2 + 1e-5
        if bool(bad.any()):
            raise ExerciseFailure(f"{what}: {int(bad.sum())} keys are more than half a step from their value "
                                  f"(worst by {float((err - step / 2).max()):.3g}): round (x - zero) / scale to the "
                                  "nearest level.")  # fmt: skip
    return "4 blocks (1 to 4 heads, 5 to 64 tokens, offset outlier channels)"


# --- 3. a Triton kernel that dequantizes int4 keys in registers ------------------------------------------


def _pack(levels: torch.Tensor) -> torch.Tensor:
    half = levels.shape[-1] // 2
    return (levels[..., :half] | (levels[..., half:] << 4)).to(torch.uint8)


def _scores(q, packed, scale, zero, *, swap=False, no_zero=False):
    p = packed.long()
    lo, hi = (p >> 4, p & 15) if swap else (p & 15, p >> 4)
    k = torch.cat([lo, hi], -1).double() * scale.double() + (0 if no_zero else zero.double())
    return k @ q.double()


@checker("int4_scores")
def check_int4_scores(fn):
    """Random packed keys, channel scales and zeros, N not a multiple of any tile size (1 to 150 keys),
    D = 32 and 64. Runs your function under the Triton interpreter when there is no GPU."""
    from ..kernels.dispatch import _interpreter_env

    g = torch.Generator().manual_seed(303)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [(1, 32), (37, 32), (awkward_length(g, 60, 150), 64), (16, 64)]
    for n, d in cases:
        levels = torch.randint(0, 16, (n, d), generator=g)
        packed = _pack(levels)
        scale = torch.rand(d, generator=g) * 0.5 + 0.01
        zero = torch.randn(d, generator=g) * 3
        q = torch.randn(d, generator=g)
        what = f"int4_scores(q [{d}], packed [{n}, {d // 2}], scale [{d}], zero [{d}])"
        with _interpreter_env(device):
            got = fn(*(t.to(device) for t in (q, packed, scale, zero)))
        got = expect_shape(got, (n,), f"the output of {what}")
        want = _scores(q, packed, scale, zero)
        hint = ""
        if torch.allclose(got.double().cpu(), _scores(q, packed, scale, zero, swap=True), atol=1e-3):
            hint = "It matches the nibbles swapped: byte j holds channel j in its LOW 4 bits (b & 15), channel j + D/2 in the high ones."
        elif torch.allclose(got.double().cpu(), _scores(q, packed, scale, zero, no_zero=True), atol=1e-3):
            hint = "It matches keys without their zero point: k = level * scale + zero."
        expect_close(got.float().cpu(), want.float(), f"the output of {what}", atol=1e-3, rtol=1e-4, hint=hint)
    return "4 key sets (1 to 150 keys, D = 32 and 64), under the Triton interpreter" if device.type == "cpu" else "4 key sets"
