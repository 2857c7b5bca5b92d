"""Quantized KV cache (lesson 03): formats, kernels against their references, and the caches end to end.

* formats: round-trip error bounds per format, on random signed data with outlier channels;
* kernels (Triton under the interpreter without a GPU): every write kernel is bit-exact with its
  reference, decode and extend equal their references on the same quantized data (lengths that are not
  block multiples, split-KV, int4 tiles inside and across pages, poisoned unused blocks);
* caches: a paged quantized cache gives exactly what an independent fake-quantizing contiguous cache
  gives (so plans, tails and completions put every token where the format says); an int4 block that
  fills mid-generation holds exactly its tokens' quantized K/V; copy-on-write and rollback; nbytes; bad
  input; int8 generation on nexus-tiny equals the float cache's; QuantizedKVCache.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # build the kernels under the interpreter, then put the environment back (as test_kernels)
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import nexus_lessons.kernels.common as common
        import nexus_lessons.kernels.quant_attention as qa
        import nexus_lessons.kernels.quant_write  # noqa: F401
    except ImportError:  # no triton at all: the kernel tests skip below
        common = qa = None
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
else:
    import nexus_lessons.kernels.common as common
    import nexus_lessons.kernels.quant_attention as qa

import nexus_lessons as nl  # noqa: E402
from nexus_lessons.kernels import quant as Q  # noqa: E402
from nexus_lessons.kernels import quant_reference as R  # noqa: E402
from nexus_lessons.kernels.quant_reference import bytes_per_token  # noqa: E402

TRITON_OK = common is not None and (HAS_CUDA or common.interpreting())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels unavailable")
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
FORMATS = ["int8", "fp8", "int4"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def keys_like(n: int, h: int, d: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Signed keys with outlier channels: a few channels 10x larger and offset, as in real models' K."""
    x = torch.randn(n, h, d, generator=g)
    outliers = torch.randperm(d, generator=g)[: max(1, d // 8)]
    x[..., outliers] = x[..., outliers] * 10 + 5
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------


def test_round_trip_error_bounds():
    g = torch.Generator().manual_seed(0)
    x = keys_like(37, 3, 32, g)
    # int8: a power-of-two scale, the smallest that holds max|x| in 127 steps; error <= half a step
    q, e = R.quantize_8bit(x, "int8")
    step = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.int())
    amax = x.abs().amax(-1)
    assert bool((amax <= 127 * step).all()) and bool((amax > 63.5 * step).all()), "scale is not the smallest power of two"
    assert bool(((R.dequantize_8bit(q, e) - x).abs() <= step[..., None] / 2).all())
    # fp8: what torch's own e4m3 conversion gives after the same scale; relative error <= 2^-4 above the
    # subnormals
    q, e = R.quantize_8bit(x, "fp8")
    assert bool((amax <= 448 * torch.ldexp(torch.ones_like(amax), e.int())).all())
    back = R.dequantize_8bit(q, e)
    normal = back.abs() >= torch.ldexp(torch.ones_like(back), e.int()[..., None] - 6)
    assert bool(((back - x).abs() <= 2**-4 * x.abs() + 1e-30)[normal].all())
    # int4 keys: per channel over the block; error <= half a step (+ fp16 rounding of min and scale)
    packed, scale, zero = R.quantize_k_int4(x[:16])
    err = (R.dequantize_k_int4(packed, scale, zero) - x[:16]).abs()
    slack = 1e-3 * x[:16].abs().amax(0)
    assert bool((err <= scale.float() / 2 + slack).all())
    assert packed.shape == (16, 3, 16) and packed.dtype == torch.uint8
    # int4 values: per token, symmetric
    v = torch.randn(37, 3, 32, generator=g)
    packed, scale = R.quantize_v_int4(v)
    err = (R.dequantize_v_int4(packed, scale) - v).abs()
    assert bool((err <= scale.float()[..., None] / 2 + 1e-3 * v.abs().amax(-1, keepdim=True)).all())
    # outlier channels: per-channel keys lose far less than per-token keys at 4 bits (KIVI's point)
    per_token = (R.quantize_dequantize(x[:16], "int4", "v") - x[:16]).norm()
    per_channel = (R.quantize_dequantize(x[:16], "int4", "k") - x[:16]).norm()
    assert per_channel < 0.5 * per_token


def test_memory_per_token_scales_included():
    for heads, dim in ((4, 32), (8, 128)):  # nexus-tiny's head_dim, and a Llama's
        bf16 = bytes_per_token("auto", heads, dim)
        assert bf16 / bytes_per_token("int8", heads, dim) >= 1.9
        assert bf16 / bytes_per_token("fp8", heads, dim) >= 1.9
        assert bf16 / bytes_per_token("int4", heads, dim, block_size=64) >= 3.5
    cache = nl.PagedKVCache(2, 4, 32, 16, 10, kv_cache_dtype="int8")
    assert cache.nbytes == 2 * 10 * 16 * bytes_per_token("int8", 4, 32)
    cache = nl.PagedKVCache(2, 4, 32, 64, 10, kv_cache_dtype="int4", dtype=torch.bfloat16)
    tail = 2 * cache.quant.num_tail_slots * 64 * 4 * 32 * 2 * 2  # layers x slots x block x H x D x (K, V) x bf16
    assert cache.nbytes == 2 * 10 * 64 * bytes_per_token("int4", 4, 32, 64) + tail
    assert cache.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# kernels against their references
# ---------------------------------------------------------------------------------------------------


def build_pool(fmt, lens, bs, heads, dim, dtype, seed=0, poison=True):
    """Random keys (outlier channels) and values for sequences of these lengths, written through the
    reference writes into shuffled blocks. int4: full blocks quantized, the rest in tail slots. Unused
    blocks and tail slots are poisoned (NaN scales / huge exponents) so that reading one shows."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 2
    kv = R.empty_quantized_kv(fmt, nb, bs, heads, dim, dtype=dtype, num_tail=len(lens) + 1)
    ids = torch.randperm(nb, generator=g)
    tables = torch.full((len(lens), max(need) + 1), nb - 1, dtype=torch.int32)
    tails = torch.full((len(lens),), -1, dtype=torch.int32)
    if poison:
        if fmt == "int4":
            kv.k_scale.fill_(float("nan")), kv.v_scale.fill_(float("nan")), kv.k_tail.fill_(float("nan"))
            kv.v_tail.fill_(float("nan"))
        else:
            kv.k_scale.fill_(120), kv.v_scale.fill_(120)  # 2^120: inf scores if ever read
    at = 0
    for b, n in enumerate(lens):
        tables[b, : need[b]] = ids[at : at + need[b]].int()
        at += need[b]
        k, v = keys_like(n, heads, dim, g, dtype), torch.randn(n, heads, dim, generator=g).to(dtype)
        pos = torch.arange(n)
        if fmt == "int4":
            full = n // bs
            comp = torch.tensor([[int(tables[b, j]), -1, 0, j * bs] for j in range(full)], dtype=torch.int32).reshape(-1, 4)
            tmap = torch.full((n,), -1, dtype=torch.long)
            if n % bs:
                tails[b] = len(lens) - b  # not the identity
                tmap[full * bs :] = tails[b] * bs + pos[full * bs :] % bs
            Q.int4_write_kv(k, v, kv, tmap, comp, impl="reference")
        else:
            Q.quant_write_kv(k, v, kv, tables[b, pos // bs].long() * bs + pos % bs, impl="reference")
    to = {n: t.to(DEV) for n, t in kv.tensors().items()}
    return R.QuantizedKV(fmt, **to), tables.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV), tails.to(DEV)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kernels_are_bit_exact(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    bs, heads, dim = 16, 3, 32
    kv = R.empty_quantized_kv(fmt, 6, bs, heads, dim, dtype=dtype, num_tail=4)
    k, v = keys_like(45, heads, dim, g, dtype).to(DEV), torch.randn(45, heads, dim, generator=g).to(dtype).to(DEV)
    k[3] = 0  # an all-zero row: the smallest scale, no division by zero
    kv = R.QuantizedKV(fmt, **{n: t.to(DEV) for n, t in kv.tensors().items()})
    if fmt == "int4":
        kv.k_tail.normal_(generator=None), kv.v_tail.normal_()
        # block 4 completes from 5 rows in tail slot 1 + 11 new rows; block 2 from 16 new rows; rows 27..44
        # go to tail slots 0 and 3
        comp = torch.tensor([[4, 1, 5, 0], [2, -1, 0, 11]], dtype=torch.int32, device=DEV)
        tmap = torch.full((45,), -1, dtype=torch.int64, device=DEV)
        tmap[27:40] = torch.arange(13, device=DEV)
        tmap[40:45] = 3 * bs + torch.arange(5, device=DEV)
        args = (tmap, comp)
        write = Q.int4_write_kv
    else:
        slots = torch.randperm(6 * bs, generator=g)[:45].to(DEV)
        slots[7] = -1
        args = (slots,)
        write = Q.quant_write_kv
    ref, tri = kv.clone(), kv.clone()
    write(k, v, ref, *args, impl="reference")
    write(k, v, tri, *args, impl="triton")
    for name, t in ref.tensors().items():
        assert _same(t, getattr(tri, name)), f"{fmt} {dtype}: {name} differs between the kernel and the reference"


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_and_extend_equal_their_references(fmt):
    dtype = torch.bfloat16 if fmt == "fp8" else torch.float32
    lens = [37, 5, 70, 16, 1]  # not block multiples, one exact, one a single token
    kv, tables, ctx, tails = build_pool(fmt, lens, 16, 2, 32, dtype, seed=2)
    q = torch.randn(len(lens), 4, 32).to(dtype).to(DEV)
    want = Q.quant_decode_attention(q, kv, tables, ctx, tail_slots=tails, impl="reference")
    assert not want.isnan().any()
    for splits in (None, 3):
        got = Q.quant_decode_attention(q, kv, tables, ctx, tail_slots=tails, impl="triton", num_splits=splits)
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOL[dtype], f"{fmt} decode splits={splits}: {err}"
    q_lens = [5, 5, 33, 1, 1]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    qx = torch.randn(sum(q_lens), 4, 32).to(dtype).to(DEV)
    k_new, v_new = (torch.randn(sum(q_lens), 2, 32).to(dtype).to(DEV) for _ in range(2))
    want = Q.quant_extend_attention(qx, kv, tables, ctx, qsl, k_new, v_new, tail_slots=tails, impl="reference")
    got = Q.quant_extend_attention(qx, kv, tables, ctx, qsl, k_new, v_new, tail_slots=tails, impl="triton")
    assert not want.isnan().any()
    assert (got.float() - want.float()).abs().max().item() <= TOL[dtype], f"{fmt} extend"


@needs_triton
def test_int4_tiles_inside_and_across_pages():
    """The folded path (a tile inside one page, scales on q) and the gathered one (a tile over 4 pages)."""
    kv, tables, ctx, tails = build_pool("int4", [45, 70], 16, 1, 32, torch.float32, seed=3)
    q = torch.randn(2, 2, 32, device=DEV)
    want = Q.quant_decode_attention(q, kv, tables, ctx, tail_slots=tails, impl="reference")
    for block_n in (16, 64):
        got = qa.quant_decode_attention_triton(q, kv, tables, ctx, None, tails, num_splits=1,
                                               config=qa.QuantDecodeConfig(block_n=block_n, num_stages=1))  # fmt: skip
        assert (got - want).abs().max().item() <= TOL[torch.float32], f"block_n={block_n}"


def test_reference_is_attention_over_the_dequantized_values():
    """The reference against float64 attention over what the formats give back (no kernel involved)."""
    g = torch.Generator().manual_seed(4)
    kv, tables, ctx, tails = build_pool("int4", [21], 16, 1, 32, torch.float32, seed=4, poison=False)
    q = torch.randn(1, 2, 32, generator=g)
    k, v = R.gather_dequantized(kv, tables[0].cpu(), 21, int(tails[0]))
    s = torch.einsum("hd,nd->hn", q[0].double(), k[:, 0].double()) / 32**0.5
    want = torch.softmax(s, -1) @ v[:, 0].double()
    got = R.quant_decode_attention_ref(q, kv, tables.cpu(), ctx.cpu(), None, tails.cpu())
    assert torch.allclose(got[0].double(), want, atol=1e-5)


def test_bad_arguments_are_named():
    kv, tables, ctx, tails = build_pool("int4", [20], 16, 1, 32, torch.float32)
    q = torch.randn(1, 2, 32, device=DEV)
    with pytest.raises(ValueError, match="tail_slots"):
        Q.quant_decode_attention(q, kv, tables, ctx)
    with pytest.raises(ValueError, match="not a tail slot"):
        Q.quant_decode_attention(q, kv, tables, ctx, tail_slots=torch.tensor([99], dtype=torch.int32, device=DEV),
                                 validate=True)
    with pytest.raises(ValueError, match="int4_write_kv"):
        Q.quant_write_kv(q[:, :1], q[:, :1], kv, torch.zeros(1, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="head_dim"):
        Q.quant_decode_attention(torch.randn(1, 2, 16, device=DEV), kv, tables, ctx, tail_slots=tails)
    with pytest.raises(TypeError, match="QuantizedKV"):
        Q.quant_decode_attention(q, "not a pool", tables, ctx)


# ---------------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------------


class FakeQuantCache:
    """An independent oracle: a contiguous cache that stores, per token, exactly what the format returns.

    8-bit formats quantize each token as it is written; int4 keeps a block in full precision until its last
    token is written, then quantizes the whole block. Prefill attends over the fresh K/V; decode over what
    is stored (the current token included), as the paged cache's kernels do.
    """

    def __init__(self, fmt: str, block_size: int) -> None:
        self.fmt, self.bs = fmt, block_size
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.seq_len = 0

    def reset(self) -> None:
        self.k, self.v, self.seq_len = {}, {}, 0

    def begin_forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        self._start, self.seq_len = self.seq_len, self.seq_len + T
        return torch.arange(self._start, self.seq_len)[None].expand(B, T)

    def attend(self, layer, q, k, v):
        from nexus_lessons.attention import sdpa

        s, e = self._start, self.seq_len
        for name, store, x in (("k", self.k, k), ("v", self.v, v)):
            old = store.get(layer, x[:, :, :0].float())
            new = torch.cat([old, x.float()], dim=2)  # [B, H, S, D]
            if self.fmt == "int4":
                for blk in range(s // self.bs, e // self.bs):  # blocks that fill now
                    a, b = blk * self.bs, (blk + 1) * self.bs
                    rows = new[:, :, a:b].transpose(1, 2)  # [B, bs, H, D]
                    new[:, :, a:b] = torch.stack([R.quantize_dequantize(r, "int4", name) for r in rows]).transpose(1, 2)
            else:
                new[:, :, s:e] = R.quantize_dequantize(x.float().transpose(1, 2), self.fmt).transpose(1, 2)
            store[layer] = new
        if e - s > 1:  # prefill: the step's own tokens in full precision
            assert s == 0
            return sdpa(q, k, v, None, causal=True)
        return sdpa(q, self.k[layer].to(q.dtype), self.v[layer].to(q.dtype), None)


def small_model(seed: int = 0):
    """A random GQA model with head_dim 32 (the Triton kernels' smallest) and peaked logits."""
    torch.manual_seed(seed)
    model = nl.Transformer(nl.ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1)).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("fmt, block_size", [("int8", 16), ("fp8", 16), ("int4", 16), ("int4", 8)])
def test_paged_quantized_cache_equals_fake_quant_oracle(fmt, block_size):
    """Generation through the quantized paged pool (plans, completions, tails, kernels' references) gives
    the tokens of the oracle; the int4 run fills blocks mid-generation (prompt 13, 14 new tokens)."""
    model = small_model()
    ids = torch.randint(0, 96, (1, 13), generator=torch.Generator().manual_seed(5))
    want = nl.generate(model, ids, 14, cache=FakeQuantCache(fmt, block_size))
    cache = nl.PagedKVCache.for_model(model, 8, block_size, kv_cache_dtype=fmt)
    got = nl.generate(model, ids, 14, cache=cache)
    assert torch.equal(got, want), f"{fmt}: {got.tolist()} != {want.tolist()}"
    cache.check_consistent()


def test_int4_block_filled_mid_generation_holds_its_tokens_quantized():
    """Layer 0's K/V depend on the tokens only (not on attention), so after generation the pool's first
    block must be exactly the quantized K/V of tokens 0..15, and the tail the float K/V of the rest."""
    model = small_model(1)
    ids = torch.randint(0, 96, (1, 13), generator=torch.Generator().manual_seed(6))
    cache = nl.PagedKVCache.for_model(model, 8, 16, kv_cache_dtype="int4")
    out = nl.generate(model, ids, 10, cache=cache)  # 22 tokens written: block 0 filled at step 3
    ref = nl.KVCache.for_model(model, 1, 32)
    with torch.no_grad():  # the same steps as generate (prefill 13, then one by one): bit-identical layer-0 K/V
        model(out[:, :13], cache=ref)
        for t in range(13, 22):
            model(out[:, t : t + 1], cache=ref)
    k0, v0 = ref.k[0][0, :, :22].transpose(0, 1), ref.v[0][0, :, :22].transpose(0, 1)  # [22, H, D]
    seq = cache.rows[0]
    block0, block1 = cache.block_table(seq)
    layer = cache.quant.layer(0)
    packed, scale, zero = R.quantize_k_int4(k0[:16])
    assert torch.equal(layer.k[block0], packed) and torch.equal(layer.k_scale[block0], scale)
    assert torch.equal(layer.k_zero[block0], zero)
    packed, vscale = R.quantize_v_int4(v0[:16])
    assert torch.equal(layer.v[block0], packed) and torch.equal(layer.v_scale[block0], vscale)
    slot = cache.quant.tail_of[block1]
    assert torch.equal(layer.k_tail[slot, :6], k0[16:]) and torch.equal(layer.v_tail[slot, :6], v0[16:])
    assert block0 not in cache.quant.tail_of  # its tail slot went back when it filled


@torch.no_grad()
def test_copy_on_write_and_rollback_with_int4_tails():
    from nexus_lessons.paged import forward_sequences

    model = small_model(2)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 96, (20,), generator=g).tolist()
    a_tok, b_tok = torch.randint(0, 96, (2, 15), generator=g).tolist()

    def alone(tokens):
        c = nl.PagedKVCache.for_model(model, 8, 16, kv_cache_dtype="int4")
        s = c.add_sequence()
        forward_sequences(model, c, [s], [prompt])
        return [forward_sequences(model, c, [s], [[t]])[0] for t in tokens]

    cache = nl.PagedKVCache.for_model(model, 8, 16, kv_cache_dtype="int4")
    a = cache.add_sequence()
    forward_sequences(model, cache, [a], [prompt])  # block 1 holds 4 tokens, in a tail slot
    b = cache.fork(a)  # shares it
    got_a, got_b = [], []
    for ta, tb in zip(a_tok, b_tok):
        la, lb = forward_sequences(model, cache, [a, b], [[ta], [tb]])
        got_a.append(la), got_b.append(lb)
    for got, want in ((got_a, alone(a_tok)), (got_b, alone(b_tok))):
        assert torch.allclose(torch.stack(got), torch.stack(want), atol=1e-4), "a fork saw the other's tokens"
    cache.check_consistent()
    assert len(cache.quant.tail_of) == 2  # each fork's unfilled block 2 (35 tokens each)
    # Roll a back into its quantized block 1: its kept rows come back dequantized into a tail slot.
    cache.truncate(a, 25)
    la = forward_sequences(model, cache, [a], [[a_tok[5]]])
    block1 = cache.block_table(a)[1]
    slot = cache.quant.tail_of[block1]
    layer = cache.quant.layer(0)
    kept = R.dequantize_k_int4(layer.k[block1], layer.k_scale[block1], layer.k_zero[block1])[:9]
    assert torch.equal(layer.k_tail[slot, :9], kept)
    assert torch.isfinite(la).all()
    cache.free(b)
    forward_sequences(model, cache, [a], [[1]])
    assert len(cache.quant.tail_of) == 1  # b's slot went back
    cache.check_consistent()


def test_bad_values_get_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        nl.PagedKVCache(1, 2, 32, 16, 4, kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="bits must be 8"):
        nl.QuantizedKVCache(1, 1, 16, 2, 32, bits=3)
    with pytest.raises(ValueError, match="head_dim must be even"):
        nl.PagedKVCache(1, 2, 33, 16, 4, kv_cache_dtype="int4")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8"):
        nl.PagedKVCache(1, 2, 32, 16, 4, kv_cache_dtype="fp8")


def test_quantized_kv_cache_is_contiguous_and_static():
    model = small_model(3)
    cache = nl.QuantizedKVCache.for_model(model, max_batch_size=2, max_seq_len=40, bits=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    out = nl.generate(model, prompts, 9, cache=cache)
    tables = [cache.block_table(s) for s in cache.rows]
    assert tables == [[0, 1, 2], [3, 4, 5]], "each row owns one run of consecutive blocks"
    paged = nl.generate(model, prompts, 9, cache=nl.PagedKVCache.for_model(model, 8, 16, kv_cache_dtype="int8"))
    assert torch.equal(out, paged)
    cache.reset()
    with pytest.raises(nl.CacheFullError), torch.no_grad():
        model(torch.ones(1, 41, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_batch_size"):
        nl.generate(model, [[1]] * 3, 2, cache=cache)
    assert nl.QuantizedKVCache(1, 1, 100, 2, 32, bits=4).block_size == 64


def test_int8_greedy_equals_float_on_nexus_tiny():
    """What is true of the shipped model: int8 KV changes no greedy token in these 24-token generations."""
    model, tok = nl.load_model("nexus-tiny")
    prompts = [tok.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = "),
               tok.encode("class Stack:\n    def __init__(self):\n        self.")]  # fmt: skip
    want = nl.generate(model, prompts, 24, cache="static")
    cache = nl.PagedKVCache.for_model(model, 16, kv_cache_dtype="int8")
    cache.validate_kernel_args = False
    from nexus_lessons.kernels import dispatch

    saved = dispatch.get_default_impl()
    dispatch.set_default_impl("reference")
    try:
        got = nl.generate(model, prompts, 24, cache=cache)
    finally:
        dispatch.set_default_impl(saved)
    assert torch.equal(got, want)


@needs_triton
def test_generation_through_the_triton_kernels_equals_the_references():
    """The whole cache through the interpreted kernels (write, completion, decode, extend) for int4."""
    from nexus_lessons.kernels import dispatch

    model = small_model(4)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(8))
    runs = {}
    saved = dispatch.get_default_impl()
    try:
        for impl in ("reference", "triton"):
            dispatch.set_default_impl(impl)
            runs[impl] = nl.generate(model, ids, 7, cache=nl.PagedKVCache.for_model(model, 8, 8, kv_cache_dtype="int4"))
    finally:
        dispatch.set_default_impl(saved)
    assert torch.equal(runs["triton"], runs["reference"])


@pytest.mark.skipif(HAS_CUDA, reason="compiles for a GPU on a machine without one")
def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from nexus_lessons.bench.quant_decode import compile_report; sys.exit(compile_report())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    report = proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert "SPILLS" not in proc.stdout, report


# ---------------------------------------------------------------------------------------------------
# the benchmark scripts' small modes
# ---------------------------------------------------------------------------------------------------


def test_kv_quality_smoke(tmp_path):
    import json

    from nexus_lessons.bench import kv_quality

    kv_quality.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "kv_quality.json").read_text())
    assert set(data["formats"]) == {"auto", "int8", "fp8", "int4"}
    assert data["heldout"]["files"] and data["heldout"]["pip_version"]
    assert all(not f.startswith(("encodings", "test")) for f in data["heldout"]["files"])
    assert data["formats"]["auto"]["increase_pct"] == 0.0
    assert data["formats"]["int4"]["bytes_per_token_per_layer"] < data["formats"]["int8"]["bytes_per_token_per_layer"]


@pytest.mark.skipif(HAS_CUDA or common is None, reason="the CPU smoke run, under the interpreter")
def test_quant_decode_smoke_under_the_interpreter(tmp_path):
    import json

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "nexus_lessons.bench", "quant_decode", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "quant_decode.json").read_text())
    rows = data["decode"][0]["formats"]
    assert [(r["format"], r["block_size"]) for r in rows] == [("bf16", 16), ("int8", 16), ("fp8", 16), ("int4", 16), ("int4", 64)]
    assert all(r["max_err_vs_reference"] <= 2e-2 for r in rows[1:]) and not data["errors"]
    assert data["extend"][0]["formats"][-1]["ms"] > 0


# ---------------------------------------------------------------------------------------------------
# GPU (-m gpu): the compiled kernels at the benchmark's head shapes (Hq 32, Hkv 8, D 128, bf16)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt, block_size", [("int8", 16), ("fp8", 16), ("int4", 16), ("int4", 64)])
def test_gpu_kernels_equal_their_references(fmt, block_size):
    lens = [1, 2 * block_size, 1000, 3001, 77]  # a single token, an exact multiple, the rest not
    kv, tables, ctx, tails = build_pool(fmt, lens, block_size, 8, 128, torch.bfloat16, seed=9)
    q = torch.randn(len(lens), 32, 128, device=DEV).to(torch.bfloat16)
    # int4 keys are dequantized to bf16 for the tensor-core dot (8-bit levels are exact in bf16): one rounding
    # more, so its bf16 outputs (up to ~5) are compared as the benchmark does, scaled by max(1, |ref|), at 4e-2.
    int4 = fmt == "int4"
    tol = 4e-2 if int4 else TOL[torch.bfloat16]

    def err(got, want):
        d = (got.float() - want.float()).abs()
        return (d / want.float().abs().clamp(min=1) if int4 else d).max().item()

    want = Q.quant_decode_attention(q, kv, tables, ctx, tail_slots=tails, impl="reference")
    for splits in (None, 1, 7):
        got = Q.quant_decode_attention(q, kv, tables, ctx, tail_slots=tails, impl="triton", num_splits=splits)
        assert err(got, want) <= tol, f"decode splits={splits}: {err(got, want)}"
    q_lens = [1, 5, 600, 33, 77]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    qx = torch.randn(sum(q_lens), 32, 128, device=DEV).to(torch.bfloat16)
    k_new, v_new = (torch.randn(sum(q_lens), 8, 128, device=DEV).to(torch.bfloat16) for _ in range(2))
    want = Q.quant_extend_attention(qx, kv, tables, ctx, qsl, k_new, v_new, tail_slots=tails, impl="reference")
    got = Q.quant_extend_attention(qx, kv, tables, ctx, qsl, k_new, v_new, tail_slots=tails, impl="triton")
    assert err(got, want) <= tol, f"extend: {err(got, want)}"
