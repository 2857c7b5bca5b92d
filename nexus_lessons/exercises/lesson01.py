"""Checkers for lesson 01 (the KV cache). Solutions: `solutions/01_kv_cache.py`.

1. `kv_cache_bytes(num_layers, seq_len, num_kv_heads, head_dim, bytes_per_elem, batch=1)`: the memory formula.
2. `attend_with_cache(k_cache, v_cache, q, k, v)`: one head, one layer: append the new keys/values to a
   growing cache and attend; equal to recomputing causal attention over the whole sequence.
3. `static_append(k_buf, v_buf, length, k, v)`: write new keys/values into preallocated buffers in place;
   no room raises ValueError.
4. `my_generate(model, input_ids, max_new_tokens)`: a cached greedy loop with `KVCache`, token-for-token
   equal to `generate(model, input_ids, max_new_tokens)` (no cache).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..config import ModelConfig
from ..generate import generate
from ..model import Transformer
from . import (
    ExerciseFailure,
    awkward_length,
    checker,
    describe,
    expect,
    expect_close,
    expect_shape,
    expect_tensor,
    random_signed,
)

__all__ = ["check_attend_with_cache", "check_kv_cache_bytes", "check_my_generate", "check_static_append"]


# --- 1. the memory formula ------------------------------------------------------------------------------


def _kv_bytes(L, T, H, d, nbytes, B):
    return B * L * T * 2 * H * d * nbytes


_KV_BYTES_MISTAKES = [
    # (what the learner's number equals, the hint)
    (lambda L, T, H, d, b, B: _kv_bytes(L, T, H, d, b, B) / 2, "Half the expected size: a cache stores both K and V."),
    (lambda L, T, H, d, b, B: _kv_bytes(L, T, H, d, b, B) / B, "Missing the batch factor: every sequence has its own cache."),
    (lambda L, T, H, d, b, B: _kv_bytes(L, T, H, d, b, B) / L, "Missing the layer factor: every layer keeps its own K and V."),
    (lambda L, T, H, d, b, B: _kv_bytes(L, T, H, d, b, B) / b, "Missing bytes_per_elem: the answer is in bytes, not elements."),
    (lambda L, T, H, d, b, B: _kv_bytes(L, T, H, d, b, B) * 8, "8x too large: bytes_per_elem is already in bytes, not bits."),
    (lambda L, T, H, d, b, B: _kv_bytes(L, T, H, d, b, B) * 2, "Twice the expected size: count K and V once each."),
]


def _as_number(x, what: str) -> float:
    if x is None:
        raise ExerciseFailure(f"{what} returned None; did you forget `return`?")
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, Real):
        raise ExerciseFailure(f"{what} should return a number of bytes, got {describe(x)}.")
    return float(x)


@checker("kv_cache_bytes")
def check_kv_cache_bytes(fn):
    """Checks `kv_cache_bytes` on real model shapes and random ones (GQA, batch > 1, int4 to fp32)."""
    g = torch.Generator().manual_seed(101)
    cases = [
        (32, 4096, 32, 128, 2, 1),  # Llama-2-7B, 4k context, bf16
        (80, 8192, 8, 128, 2, 1),  # Llama-3-70B (GQA), 8k context, bf16
        (8, 2048, 4, 32, 4, 1),  # nexus-tiny, fp32
    ]
    for _ in range(12):
        L = int(torch.randint(1, 97, (1,), generator=g))
        T = awkward_length(g, 1, 100_000)
        H = int(torch.randint(1, 65, (1,), generator=g))
        d = [64, 80, 96, 128, 256][int(torch.randint(5, (1,), generator=g))]
        b = [0.5, 1, 2, 4][int(torch.randint(4, (1,), generator=g))]  # int4, int8/fp8, bf16, fp32
        B = int(torch.randint(2, 65, (1,), generator=g))
        cases.append((L, T, H, d, b, B))
    for L, T, H, d, b, B in cases:
        want = _kv_bytes(L, T, H, d, b, B)
        if B == 1:
            call = f"kv_cache_bytes({L}, {T}, {H}, {d}, {b})"
            got = _as_number(fn(L, T, H, d, b), call)
        else:
            call = f"kv_cache_bytes({L}, {T}, {H}, {d}, {b}, batch={B})"
            got = _as_number(fn(L, T, H, d, b, batch=B), call)
        if not math.isclose(got, want, rel_tol=1e-9):
            hints = [h for f, h in _KV_BYTES_MISTAKES if math.isclose(got, f(L, T, H, d, b, B), rel_tol=1e-9)]
            hint = (" " + " Or: ".join(hints)) if hints else ""
            raise ExerciseFailure(f"{call}: expected {want:,.0f} bytes ({want / 2**30:.3f} GiB), got {got:,.0f}."
                                  f"{hint}")
    return f"{len(cases)} cases (Llama-2-7B, Llama-3-70B, nexus-tiny and random shapes with GQA, batch > 1, int4 to fp32)"


# --- 2. attention over a growing cache ------------------------------------------------------------------


def _causal_attention(q, k, v, offset, scale=True, causal=True):
    """Reference in float64: queries at positions offset..offset+Tq-1 over keys 0..Tk-1."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.T
    if scale:
        scores = scores / math.sqrt(q.shape[-1])
    if causal:
        qpos = torch.arange(q.shape[0])[:, None] + offset
        scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _chunks(g: torch.Generator, total: int) -> list[int]:
    """A prefill of awkward length, then single tokens, with one multi-token chunk in the middle."""
    first = awkward_length(g, 1, max(1, total // 2))
    sizes, left = [first], total - first
    multi = awkward_length(g, 2, 7) if left > 8 else 0
    at = int(torch.randint(1, max(2, left - multi), (1,), generator=g)) if multi else -1
    while left > 0:
        if len(sizes) == at and multi:
            sizes.append(min(multi, left))
        else:
            sizes.append(1)
        left -= sizes[-1]
    return sizes


@checker("attend_with_cache")
def check_attend_with_cache(fn):
    """Feeds a random sequence chunk by chunk (prefill, single tokens, one multi-token chunk) and compares
    every chunk's output with causal attention recomputed over the whole sequence."""
    g = torch.Generator().manual_seed(102)
    n_cases = 0
    for d in (8, 24, 40, 64):
        total = awkward_length(g, 13, 75)
        q_all = random_signed(total, d, generator=g)
        k_all = random_signed(total, d, generator=g)
        v_all = random_signed(total, d, generator=g)
        want_all = _causal_attention(q_all, k_all, v_all, 0).float()
        k_cache, v_cache, past = torch.empty(0, d), torch.empty(0, d), 0
        for size in _chunks(g, total):
            sl = slice(past, past + size)
            call = f"attend_with_cache(k_cache [{past}, {d}], v_cache [{past}, {d}], q/k/v [{size}, {d}])"
            got = fn(k_cache, v_cache, q_all[sl], k_all[sl], v_all[sl])
            expect(isinstance(got, (tuple, list)) and len(got) == 3,
                   f"{call} should return (out, k_cache, v_cache), got {describe(got)}.")
            out, k_new, v_new = got
            expect_shape(k_new, (past + size, d), f"the k_cache returned by {call}")
            expect_shape(v_new, (past + size, d), f"the v_cache returned by {call}")
            expect_close(k_new, k_all[: past + size], f"the k_cache returned by {call}",
                         hint="The new cache is the old keys followed by the new ones, in order.")
            expect_close(v_new, v_all[: past + size], f"the v_cache returned by {call}",
                         hint="The new cache is the old values followed by the new ones, in order.")
            out = expect_shape(out, (size, d), f"the output of {call}")
            hint = _attention_hint(out, q_all[sl], k_all[: past + size], v_all[: past + size], past)
            expect_close(out, want_all[sl], f"the output of {call}", atol=2e-5, rtol=1e-4, hint=hint)
            k_cache, v_cache, past = k_new, v_new, past + size
            n_cases += 1
    return f"{n_cases} chunks of 4 random sequences (head_dim 8 to 64, prefill, single tokens, multi-token chunks)"


def _attention_hint(out, q, k, v, past) -> str:
    out = out.detach().double()
    if torch.allclose(out, _causal_attention(q, k, v, past, causal=False), atol=2e-5, rtol=1e-4):
        return ("It equals attention *without* the causal mask: when several tokens arrive at once, new token i "
                f"(position {past} + i) may only see keys 0 .. {past} + i.")
    if torch.allclose(out, _causal_attention(q, k, v, past, scale=False), atol=2e-5, rtol=1e-4):
        return "It equals attention without the 1/sqrt(head_dim) scale on the scores."
    if past and torch.allclose(out, _causal_attention(q, k, v, 0), atol=2e-5, rtol=1e-4):
        return (f"It equals a causal mask that starts at position 0: the new queries sit at positions {past} and "
                "later, so the mask must be shifted by the cache length.")
    return ""


# --- 3. writing into a preallocated buffer --------------------------------------------------------------


def _as_length(x, what: str) -> int:
    if x is None:
        raise ExerciseFailure(f"{what} returned None; it should return the new length (an int).")
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, int):
        raise ExerciseFailure(f"{what} should return the new length as an int, got {describe(x)}.")
    return x


@checker("static_append")
def check_static_append(fn):
    """Appends chunks of awkward sizes into preallocated buffers full of random old values; checks the
    written slots, that later slots are untouched, the returned length, and that an append with no room
    raises ValueError before writing anything."""
    g = torch.Generator().manual_seed(103)
    n_cases = 0
    for d in (8, 24, 40):
        max_len = awkward_length(g, 37, 90)
        total = max_len - awkward_length(g, 1, 5)
        k_all, v_all = random_signed(total, d, generator=g), random_signed(total, d, generator=g)
        k_buf, v_buf = random_signed(max_len, d, generator=g), random_signed(max_len, d, generator=g)
        k_old, v_old = k_buf.clone(), v_buf.clone()
        length = 0
        for size in _chunks(g, total):
            sl = slice(length, length + size)
            call = f"static_append(k_buf [{max_len}, {d}], v_buf, length={length}, k/v [{size}, {d}])"
            new_len = _as_length(fn(k_buf, v_buf, length, k_all[sl], v_all[sl]), call)
            expect(new_len == length + size, f"{call} returned {new_len}; the new length is {length} + {size} = "
                                             f"{length + size}.")
            length = new_len
            for name, buf, ref, old in (("k_buf", k_buf, k_all, k_old), ("v_buf", v_buf, v_all, v_old)):
                expect_close(buf[:length], ref[:length], f"{name}[:{length}] after {call}",
                             hint="Write the new rows at slots length .. length + T - 1, in place.")
                expect(torch.equal(buf[length:], old[length:]),
                       f"after {call}, {name}[{length}:] changed: slots past the new length must stay untouched.")
            n_cases += 1
        # One chunk more than the room left must fail loudly and write nothing.
        room = max_len - length
        k_big, v_big = random_signed(room + 2, d, generator=g), random_signed(room + 2, d, generator=g)
        before_k, before_v = k_buf.clone(), v_buf.clone()
        call = f"static_append(k_buf [{max_len}, {d}], v_buf, length={length}, k/v [{room + 2}, {d}])"
        try:
            fn(k_buf, v_buf, length, k_big, v_big)
        except NotImplementedError:
            raise
        except ValueError:
            pass
        except Exception as e:
            raise ExerciseFailure(f"{call} raised {type(e).__name__}: {e}. Only {room} slots are free: check the room "
                                  "yourself, before writing, and raise a ValueError that says the cache is full. An "
                                  "error from an out-of-range write (a shape mismatch, an IndexError) names the symptom, "
                                  "not the problem.") from None
        else:
            raise ExerciseFailure(f"{call} should raise a ValueError (only {room} slots are free), but it returned: a "
                                  "full cache must fail loudly, never drop tokens.")
        expect(torch.equal(k_buf, before_k) and torch.equal(v_buf, before_v),
               f"{call} raised, but wrote into the buffers first: check the room before writing.")
        n_cases += 1
    return (f"{n_cases} appends into 3 random buffers (prefill, single tokens, multi-token chunks, and a chunk with "
            "no room: ValueError, nothing written)")


# --- 4. the cached generation loop ----------------------------------------------------------------------

_TINY: Transformer | None = None


def tiny_model() -> Transformer:
    """A small random-weight model (fixed seed) the generation checkers use: fast, GQA, awkward sizes."""
    global _TINY
    if _TINY is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(104)
            cfg = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=False)  # untied: random tied weights just repeat the last token
            _TINY = Transformer(cfg).eval()
    return _TINY


@checker("my_generate")
def check_my_generate(fn):
    """Runs `my_generate` on a small random model and compares with `generate(model, ids, n)` (no cache),
    token for token; also counts the token positions fed to the model (a cache feeds each one once)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(105)
    fed = []
    hook = model.embed_tokens.register_forward_pre_hook(lambda _m, args: fed.append(args[0].shape[-1]))
    try:
        cases = [(1, 1, 5), (1, awkward_length(g, 5, 15), 9), (1, awkward_length(g, 17, 31), 1), (2, 7, 6)]
        for B, T, n in cases:
            ids = torch.randint(model.config.vocab_size, (B, T), generator=g)
            with torch.inference_mode():
                want = generate(model, ids, n)
            fed.clear()
            call = f"my_generate(model, input_ids [{B}, {T}], {n})"
            got = expect_tensor(fn(model, ids.clone(), n), call)
            expect_shape(got, (B, T + n), f"the output of {call} (prompt + new tokens)")
            expect(not got.is_floating_point(), f"{call} should return token ids (a LongTensor), got {got.dtype}.")
            expect(torch.equal(got[:, :T], ids), f"{call} must return the prompt first, unchanged, then the new tokens.")
            if not torch.equal(got, want):
                r, t = (got != want).nonzero()[0].tolist()
                raise ExerciseFailure(
                    f"{call}: new token {t - T} of row {r} (position {t}) is {int(got[r, t])}, the no-cache "
                    f"generate gives {int(want[r, t])}. Tokens before it agree. Check the decode step: feed only the "
                    "newest token, with the same cache object, and take the argmax of the last position's logits.")
            total = sum(fed)
            expect(total <= T + n,
                   f"{call} fed the model {total} token positions; with a cache the prompt goes in once and then one "
                   f"token per step: {T} + {n} - 1 = {T + n - 1}. Are you re-running the whole sequence each step?")
    finally:
        hook.remove()
    return f"{len(cases)} prompts on a random GQA model (prompt lengths 1 to 31, batch 1 and 2, 1 to 9 new tokens)"
