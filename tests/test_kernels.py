"""Paged-attention kernels: every Triton kernel and every reference against a float64 oracle.

Without a GPU the Triton kernels run under the interpreter: this module turns it on just long enough to
build them, then restores TRITON_INTERPRET, so other test modules keep the fast reference path under
``impl="auto"``. Shapes are small on purpose (the interpreter runs each program in numpy).
GPU tests (``-m gpu``) run the compiled kernels at the benchmark's head shapes.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nexus_lessons.kernels import dispatch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # build the kernels under the interpreter, then put the environment back
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        dispatch.triton_kernels()  # imports every kernel module, all interpreted
        try:  # newer triton imports gluon at the first launch, and gluon must see the interpreter too
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
else:
    dispatch.triton_kernels()

if dispatch.triton_kernels() is not None:
    from nexus_lessons.kernels import common, decode, extend
    from nexus_lessons.kernels import decode_streamk as sk
else:  # no triton at all: the Triton tests skip below
    common = decode = extend = sk = None

from nexus_lessons import kernels as K  # noqa: E402

TRITON_OK = common is not None and (HAS_CUDA or common.interpreting())
needs_triton = pytest.mark.skipif(
    not TRITON_OK,
    reason="Triton kernels unavailable (no triton, or it was imported before TRITON_INTERPRET=1)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------------------------------------------
# data and the float64 oracle
# ---------------------------------------------------------------------------------------------------


def make_paged(
    lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    spare_blocks: int = 3,
    spare_columns: int = 2,
    device: torch.device = DEV,
):
    """A KV pool with random signed values, shuffled block tables, and a poison block.

    Unused table entries point at the last block, filled with NaN: a kernel that reads past a
    sequence's length turns its output into NaN, which the comparisons catch.
    """
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + spare_blocks + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    poison = num_blocks - 1
    k_cache[poison] = float("nan")
    v_cache[poison] = float("nan")
    ids = torch.randperm(num_blocks - 1, generator=g)
    width = max(need) + spare_columns
    tables = torch.full((len(lens), width), poison, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[at : at + n].to(torch.int32)
        at += n
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return k_cache.to(device), v_cache.to(device), tables.to(device), context_lens.to(device)


def gather64(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """Token t of the sequence is at (table[t // block_size], t % block_size): [n, Hkv, D] float64."""
    bs = cache.shape[1]
    ids = table.tolist()
    blocks = torch.tensor([ids[t // bs] for t in range(n)], device=cache.device)
    offsets = torch.tensor([t % bs for t in range(n)], device=cache.device)
    return cache[blocks, offsets].double()


def oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """float64 softmax attention. q [T, Hq, D]; k, v [S, Hkv, D]; visible [T, S] bool -> [T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("thd,shd->hts", q.double(), k) * scale
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), v)


def oracle_decode(q, k_cache, v_cache, tables, lens, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = []
    for b, n in enumerate(lens.tolist()):
        k, v = gather64(k_cache, tables[b], n), gather64(v_cache, tables[b], n)
        out.append(
            oracle_attention(q[b : b + 1], k, v, torch.ones(1, n, dtype=torch.bool, device=q.device), scale)[
                0
            ]
        )
    return torch.stack(out)


def oracle_prefill(q, k_cache, v_cache, tables, lens, qsl, scale=None, custom_mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    starts = qsl.tolist()
    for b, n in enumerate(lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        t = hi - lo
        if t == 0:
            continue
        prefix = n - t
        visible = torch.zeros(t, n, dtype=torch.bool, device=q.device)
        for i in range(t):
            visible[i, :prefix] = True
            if custom_mask is None:
                visible[i, prefix : prefix + i + 1] = True
            else:
                visible[i, prefix:] = custom_mask[lo + i, :t]
        k, v = gather64(k_cache, tables[b], n), gather64(v_cache, tables[b], n)
        out[lo:hi] = oracle_attention(q[lo:hi], k, v, visible, scale)
    return out


def assert_close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (read past a sequence's blocks?)"
    err = (out.double() - want).abs().max().item()
    assert err <= TOL[dtype], f"{what}: max abs error {err:.3g} > {TOL[dtype]} ({dtype})"


def random_lens(rng: random.Random, batch: int, block_size: int, top: int) -> list[int]:
    """Lengths that include 1, an exact block multiple, and ones that are not multiples of the block size."""
    lens = [1, 2 * block_size] + [rng.randint(2, top) for _ in range(batch - 2)]
    lens = [n + 1 if n % block_size == 0 and i > 1 else n for i, n in enumerate(lens)]
    rng.shuffle(lens)
    return lens


IMPLS = ["reference", pytest.param("triton", marks=needs_triton)]


# ---------------------------------------------------------------------------------------------------
# write_kv_cache
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cache(impl, dtype):
    bs, hkv, d = 4, 2, 32
    k_cache, v_cache, _, _ = make_paged([20], bs, hkv, d, dtype, spare_blocks=4)
    k_cache.zero_(), v_cache.zero_()
    wide = torch.randn(7, hkv, 2 * d).to(dtype).to(DEV)
    k, v = wide[:, :, :d], torch.randn(7, hkv, d).to(dtype).to(DEV)  # k is a strided view
    slots = torch.tensor([5, -1, 0, 23, -1, 17, 2], dtype=torch.int64, device=DEV)
    K.write_kv_cache(k, v, k_cache, v_cache, slots, impl=impl)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEV)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        assert torch.equal(k_cache[s // bs, s % bs], k[i]) and torch.equal(v_cache[s // bs, s % bs], v[i])
        written[s // bs, s % bs] = True
    assert not k_cache[~written].any() and not v_cache[~written].any(), (
        "a slot that was not asked for changed"
    )


@needs_triton
def test_write_kv_cache_int32_slots_and_empty():
    k_cache, v_cache, _, _ = make_paged([8], 4, 1, 16, torch.float32)
    before = k_cache.clone()
    empty = torch.empty(0, 1, 16, device=DEV)
    K.write_kv_cache(
        empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int32, device=DEV), impl="triton"
    )
    assert torch.equal(k_cache.nan_to_num(), before.nan_to_num())
    k = torch.randn(3, 1, 16, device=DEV)
    K.write_kv_cache(
        k, k, k_cache, v_cache, torch.tensor([-1, -1, 9], dtype=torch.int32, device=DEV), impl="triton"
    )
    assert torch.equal(k_cache[2, 1], k[2])


# ---------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_matches_oracle(impl, dtype, group):
    rng = random.Random(group)
    bs, hkv, d = 4, 2, 32
    lens = random_lens(rng, 5, bs, 70)
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, dtype, seed=group)
    q = torch.randn(len(lens), hkv * group, d).to(dtype).to(DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    splits = 3 if group > 1 else None  # None -> 1 split on CPU (the direct-output path)
    out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl=impl, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, want, dtype, f"{impl} splits={splits} lens={lens}")


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 5, 12])
def test_decode_split_merge(splits):
    """Forced split counts, including more splits than 32-token tiles (some splits are empty)."""
    bs, hkv, group, d = 16, 1, 4, 32
    lens = [1, 47, 130, 96]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=splits)
    q = torch.randn(len(lens), hkv * group, d, device=DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton", num_splits=splits)
    assert_close(out, want, torch.float32, f"splits={splits}")


@needs_triton
def test_decode_bf16_strided_q_custom_scale_odd_head_dim():
    """bf16 (upcast under the interpreter), q a strided view, scale given, D = 48 (not a power of 2)."""
    bs, hkv, group, d = 8, 2, 2, 48
    lens = [9, 33, 16]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, torch.bfloat16, seed=7)
    q = torch.randn(len(lens), 2 * hkv * group, d).to(torch.bfloat16).to(DEV)[:, ::2]
    want = oracle_decode(q, k_cache, v_cache, tables, ctx, scale=0.3)
    for impl in ("triton", "reference"):
        out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.3, impl=impl, num_splits=2)
        assert_close(out, want, torch.bfloat16, impl)


@needs_triton
def test_decode_and_extend_take_broadcast_lengths():
    """context_lens / query_start_loc as stride-0 or sliced views (what a CUDA-graph step builds)."""
    bs, hkv, group, d = 16, 2, 2, 32
    lens = [37, 37, 37]
    k_cache, v_cache, tables, _ = make_paged(lens, bs, hkv, d, torch.float32, seed=3)
    ctx = torch.tensor([37], dtype=torch.int32, device=DEV).expand(3)
    q = torch.randn(3, hkv * group, d, device=DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx.contiguous())
    for splits in (1, 2):
        out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton", num_splits=splits)
        assert_close(out, want, torch.float32, f"splits={splits}")
    qsl = torch.tensor([0, 0, 5, 5, 10, 10, 15], dtype=torch.int32, device=DEV)[::2]  # a strided view
    qx = torch.randn(15, hkv * group, d, device=DEV)
    ref = K.paged_prefill_attention(qx, k_cache, v_cache, tables, ctx, qsl.contiguous(), impl="reference")
    got = K.paged_prefill_attention(qx, k_cache, v_cache, tables, ctx, qsl, impl="triton")
    assert_close(got, ref.double(), torch.float32, "extend")


@needs_triton
@pytest.mark.parametrize("dtype, group", [(torch.float32, 3), (torch.float16, 4)])
def test_decode_split_tiles_and_merge(dtype, group):
    """Split launches (block ids prefetched one tile ahead; the last split to arrive merges all GROUP heads
    at once; 3: one padded head in its tile): 16- and 32-token tiles, lengths that end mid-tile, mid-page
    and on a page boundary, many splits (some empty), NaN in every slot past a sequence's end. A second
    call on the same counter workspace proves the counters were reset to 0."""
    bs, hkv, d = 16, 2, 32
    lens = [1, 47, 130, 96, 16, 33]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, dtype, seed=21 + group)
    q = torch.randn(len(lens), hkv * group, d).to(dtype).to(DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    base = decode.default_decode_config(dtype, d, q.device)
    for block_n, splits in ((16, 17), (32, 3)):  # 17 x 16-token tiles: most sequences leave splits empty
        cfg = decode.DecodeConfig(block_n=block_n, num_warps=base.num_warps, num_stages=base.num_stages)
        a = sk.paged_decode_attention_triton(q, k_cache, v_cache, tables, ctx, num_splits=splits, config=cfg)
        assert not decode.merge_counters(q.device, len(lens) * hkv).any(), "the last arriver must reset its counter"
        b = sk.paged_decode_attention_triton(q, k_cache, v_cache, tables, ctx, num_splits=splits, config=cfg)
        assert_close(a, want, dtype, f"block_n={block_n} splits={splits}")
        assert torch.equal(a, b), "a second call on the same workspace differs"


@needs_triton
@pytest.mark.parametrize("bound", ["tight", "loose", "too small"])
def test_decode_host_split(bound):
    """``max_context_len`` given: each split's share comes from it on the host, in whole pages (13 pages over
    5 splits: 2 or 3 each). A loose bound leaves late splits empty; one below the real lengths must still
    cover every token (the last split takes the rest)."""
    bs, hkv, group, d = 16, 2, 4, 32
    lens = [1, 47, 130, 96, 16, 200]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=23)
    q = torch.randn(len(lens), hkv * group, d).to(DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    max_len = {"tight": max(lens), "loose": 3 * max(lens), "too small": 50}[bound]
    for block_n, splits in ((16, 2), (16, 13), (32, 5)):  # 32: ranges start inside a tile
        cfg = decode.DecodeConfig(block_n=block_n, num_warps=4, num_stages=1)
        got = sk.paged_decode_attention_triton(q, k_cache, v_cache, tables, ctx, num_splits=splits,
                                               max_context_len=max_len, config=cfg)  # fmt: skip
        assert_close(got, want, torch.float32, f"{bound} bound, {splits} splits, block_n={block_n}")


@needs_triton
def test_default_decode_config_many_programs(monkeypatch):
    """One-warp 32-token programs only when B x Hkv gives many programs per SM, only for 16-bit K/V."""
    monkeypatch.setattr(decode, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    few = decode.default_decode_config(torch.bfloat16, 128, cuda, 64 * 8)
    many = decode.default_decode_config(torch.bfloat16, 128, cuda, 256 * 8)
    assert (few.block_n, few.num_warps, few.streamk) == (64, 4, True)
    assert (many.block_n, many.num_warps, many.streamk) == (32, 1, False)  # many waves already: no stream-K
    assert decode.default_decode_config(torch.bfloat16, 128, cuda) == few  # programs unknown: the usual tile
    assert decode.default_decode_config(torch.float32, 128, cuda, 256 * 8).num_warps == 4


@needs_triton
@pytest.mark.parametrize("dtype, group", [(torch.float32, 1), (torch.bfloat16, 4)])
def test_decode_streamk_matches_oracle(dtype, group):
    """Stream-K: grids of 1 program up to more programs than tiles cut the units at every place (inside a
    page, on page and tile boundaries, several units per program and several programs per unit); random
    signed values, NaN past every sequence's end."""
    bs, hkv, d = 16, 2, 32
    lens = [1, 47, 130, 96, 16, 33]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, dtype, seed=31 + group)
    q = torch.randn(len(lens), hkv * group, d).to(dtype).to(DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    base = decode.default_decode_config(dtype, d, q.device)
    cfg = decode.DecodeConfig(block_n=16, num_warps=base.num_warps, num_stages=base.num_stages)
    for programs in (1, 5, 1000):  # 29 tiles in all: 1000 programs leaves 971 idle
        out = sk.paged_decode_attention_streamk(q, k_cache, v_cache, tables, ctx, num_programs=programs, config=cfg)
        assert_close(out, want, dtype, f"stream-K P={programs}")


def test_choose_schedule():
    """ "auto" keeps the split grid when it fills its last wave, and takes stream-K when that wave is thin
    or the lengths are spread."""
    assert decode.choose_schedule(5, 5, 4) == "streamk"  # 2 waves, the second 25% full
    assert decode.choose_schedule(8, 8, 4) == "split"  # 2 full waves
    assert decode.choose_schedule(15, 15, 4) == "split"  # the second wave 94% full
    assert decode.choose_schedule(3, 3, 4) == "split"  # one wave
    assert decode.choose_schedule(3, 3, 4, spread=True) == "streamk"
    assert decode.choose_schedule(decode.STREAMK_MAX_BATCH + 1, 5000, 4) == "split"


@needs_triton
def test_decode_launcher_picks_streamk_on_a_thin_wave(monkeypatch):
    """On CPU a "GPU" has 1 SM holding 4 programs: 5 sequences x 1 KV head, unsplit, is 2 waves with the
    second 25% full, so the launcher takes stream-K; a forced split count, or lengths the caller says are
    not spread, keep the split kernel where it fills its wave."""
    bs, hkv, d = 16, 1, 32
    lens = [20, 3, 64, 17, 50]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=5)
    q = torch.randn(len(lens), 2 * hkv, d, device=DEV)
    if HAS_CUDA:
        pytest.skip("the wave arithmetic here is the interpreter's (1 SM, 4 programs)")
    calls = []
    real = sk.paged_decode_attention_streamk
    monkeypatch.setattr(sk, "paged_decode_attention_streamk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton")
    assert calls, "auto should have taken stream-K for 5 programs on 4 slots"
    assert_close(out, oracle_decode(q, k_cache, v_cache, tables, ctx), torch.float32, "auto -> stream-K")
    calls.clear()
    K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton", num_splits=1)
    K.paged_decode_attention(q[:3], k_cache, v_cache, tables[:3], ctx[:3], impl="triton")  # one wave
    assert not calls, "a forced split count, or a grid within one wave, keeps the split kernel"
    K.paged_decode_attention(q[:3], k_cache, v_cache, tables[:3], ctx[:3], impl="triton", max_context_len=64,
                             mean_context_len=20.0)  # fmt: skip
    assert calls, "spread lengths (max > 1.5 x mean) take stream-K"
    with pytest.raises(ValueError, match="num_programs"):
        sk.paged_decode_attention_streamk(q, k_cache, v_cache, tables, ctx, num_programs=0)


@needs_triton
def test_choose_num_splits_and_plan(monkeypatch):
    # H100/H200: 132 SMs, Hkv 8. Batch 1 x 32k must spread over the GPU; big batches need no split.
    assert decode.choose_num_splits(1, 8, 32768, 132) == 32  # 33 wanted at 2 per SM: 16 tiles each
    assert decode.choose_num_splits(1, 8, 32768, 132, programs_per_sm=4) == 64  # 66 wanted: 8 tiles each
    assert decode.choose_num_splits(16, 8, 4096, 132) == 2  # 3 would be 384 programs on 264 slots: 2 waves
    assert decode.choose_num_splits(256, 8, 1024, 132) == 1
    assert decode.choose_num_splits(64, 8, 4096, 132) == 1  # 512 programs already: >= 2 per SM
    assert decode.choose_num_splits(1, 8, 100, 132) == 1  # too short to be worth splitting
    assert decode.choose_num_splits(4, 8, 1 << 20, 132) <= decode.MAX_SPLITS
    # The plan, from host facts only (meta tensors hold no values at all), cached per tile count.
    monkeypatch.setattr(decode, "num_sms", lambda device: 132)
    meta = torch.device("meta")
    cache = torch.empty(4096, 16, 8, 128, device=meta, dtype=torch.bfloat16)
    cfg = decode.DecodeConfig(streamk=False)

    def plan(batch, width, **kw):
        q = torch.empty(batch, 32, 128, device=meta, dtype=torch.bfloat16)
        tables = torch.empty(batch, width, device=meta, dtype=torch.int32)
        lens = torch.empty(batch, device=meta, dtype=torch.int32)
        return decode.plan_decode(q, cache, cache, tables, lens, kw.get("num_splits"), kw.get("max_context_len"),
                                  None, cfg)  # fmt: skip

    long = plan(1, 2048)  # no bound given: the table's width, 2048 x 16 tokens
    assert (long.splits, long.meta["PREFETCH_IDS"], long.meta["HOST_SPLIT"]) == (32, True, False)
    host = plan(1, 4096, max_context_len=32768)
    assert (host.splits, host.meta["HOST_SPLIT"]) == (32, True)
    assert plan(1, 4096, max_context_len=32767) is host  # same tile count: the cached plan
    wide = plan(64, 256)
    assert (wide.splits, wide.meta["PREFETCH_IDS"], wide.meta["DIRECT_OUT"]) == (1, False, True)
    with pytest.raises(ValueError, match="num_splits"):
        plan(1, 8, num_splits=decode.MAX_SPLITS + 1)


# ---------------------------------------------------------------------------------------------------
# extend / prefill
# ---------------------------------------------------------------------------------------------------


def make_queries(
    lens: list[int], q_lens: list[int], num_heads: int, d: int, dtype: torch.dtype, seed: int = 0
):
    g = torch.Generator().manual_seed(seed + 100)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), num_heads, d, generator=g).to(dtype)
    return q.to(DEV), qsl.to(DEV)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_matches_oracle(impl, dtype, group):
    """Chunked prefill with a cached prefix, a fresh prompt, a single token, an empty row, exact blocks."""
    bs, d = 4, 32
    hkv = 2 if group < 4 else 1
    q_lens = [37, 70, 1, 0, 8]
    lens = [37 + 29, 70, 1 + 10, 5, 16]  # prefixes 29, 0, 10, 5, 8; 70 spans three 32-query tiles
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, dtype, seed=group)
    q, qsl = make_queries(lens, q_lens, hkv * group, d, dtype, seed=group)
    want = oracle_prefill(q, k_cache, v_cache, tables, ctx, qsl)
    out = K.paged_prefill_attention(q, k_cache, v_cache, tables, ctx, qsl, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, want, dtype, impl)


def tree_mask(sizes: list[int], rng: random.Random) -> torch.Tensor:
    """A random draft tree per sequence: node i's parent is an earlier node; it sees its ancestors and itself."""
    rows = []
    width = max(sizes)
    for n in sizes:
        parent = [-1] + [rng.randrange(i) for i in range(1, n)]
        for i in range(n):
            row = [False] * width
            j = i
            while j >= 0:
                row[j] = True
                j = parent[j]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_tree_mask(impl, dtype):
    bs, hkv, group, d = 6, 2, 2, 32  # a block size that is not a power of two
    q_lens = [7, 40, 1]
    # prefix 62 spans two 32-key tiles; the second tree has no cached prefix, so only the mask keeps its
    # rows non-empty
    lens = [7 + 62, 40, 1 + 3]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, dtype, seed=3)
    q, qsl = make_queries(lens, q_lens, hkv * group, d, dtype, seed=3)
    mask = tree_mask(q_lens, random.Random(0)).to(DEV)
    want = oracle_prefill(q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask)
    out = K.paged_prefill_attention(q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask, impl=impl)
    assert_close(out, want, dtype, f"{impl} tree")


def new_rows(cache: torch.Tensor, tables: torch.Tensor, lens: list[int], q_lens: list[int]) -> torch.Tensor:
    """The new tokens' rows of the cache, packed like q: [total_q, Hkv, D] (what an engine just wrote)."""
    rows = [K.gather_kv(cache, tables[b], n)[n - t :] for b, (n, t) in enumerate(zip(lens, q_lens))]
    return torch.cat(rows).contiguous()


def poison_new_slots(
    cache: torch.Tensor, tables: torch.Tensor, lens: list[int], q_lens: list[int]
) -> torch.Tensor:
    """A copy of the cache with the new tokens' slots set to NaN: a kernel told to read them from k_new
    must not touch them."""
    cache = cache.clone()
    bs = cache.shape[1]
    for b, (n, t) in enumerate(zip(lens, q_lens)):
        for pos in range(n - t, n):
            cache[int(tables[b, pos // bs]), pos % bs] = float("nan")
    return cache


EXTEND_NEW_KV_MODES = [
    "reference",
    pytest.param("pointer", marks=needs_triton),
    pytest.param("tma", marks=needs_triton),
]


def _extend_new_kv(mode, q, kc, vc, tables, ctx, qsl, kn, vn, mask=None, block=(32, 16)):
    if mode == "reference":
        return K.paged_prefill_attention(q, kc, vc, tables, ctx, qsl, custom_mask=mask, k_new=kn, v_new=vn,
                                         impl="reference")  # fmt: skip
    if mode == "tma" and not extend.tma_available(q.device):
        pytest.skip("this triton cannot run tensor descriptors here")
    cfg = extend.ExtendConfig(block_m=block[0], block_n=block[1], num_warps=4, num_stages=1, tma=mode == "tma")
    return extend.paged_prefill_attention_triton(
        q, kc, vc, tables, ctx, qsl, None, mask, k_new=kn, v_new=vn, config=cfg
    )


@pytest.mark.parametrize("mode", EXTEND_NEW_KV_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_new_kv_matches_oracle(mode, dtype, group):
    """k_new/v_new: cached prefixes of 0, a block multiple, odd lengths; new lengths 1, odd, several
    tiles. The pages of the new tokens hold NaN, so reading them instead of k_new would show."""
    rng = random.Random(group)
    bs, d = 16, 32
    hkv = 2 if group == 1 else 1
    q_lens = [37, 70, 1, 1, 16, rng.randint(2, 50)]
    prefix = [0, 16, 29, 0, 32, rng.randint(1, 60)]
    lens = [t + c for t, c in zip(q_lens, prefix)]
    kc, vc, tables, ctx = make_paged(lens, bs, hkv, d, dtype, seed=group + 40)
    q, qsl = make_queries(lens, q_lens, hkv * group, d, dtype, seed=group)
    kn, vn = new_rows(kc, tables, lens, q_lens), new_rows(vc, tables, lens, q_lens)
    want = oracle_prefill(q, kc, vc, tables, ctx, qsl)
    paged = K.paged_prefill_attention(
        q, kc, vc, tables, ctx, qsl, impl="triton" if TRITON_OK else "reference"
    )
    kp, vp = poison_new_slots(kc, tables, lens, q_lens), poison_new_slots(vc, tables, lens, q_lens)
    out = _extend_new_kv(mode, q, kp, vp, tables, ctx, qsl, kn, vn)
    if mode == "tma":  # the descriptor path really ran (the layouts allow descriptors)
        assert all(extend._descriptor(t, 16, d) is not None for t in (q, kn, vn))
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, want, dtype, f"{mode} new_kv")
    torch.testing.assert_close(
        out.double(), paged.double(), atol=TOL[dtype], rtol=0
    )  # the call without k_new


@pytest.mark.parametrize("mode", EXTEND_NEW_KV_MODES)
def test_prefill_new_kv_tree_mask_and_tiles(mode):
    """A custom (tree) mask with k_new, and tiles where BLOCK_M != BLOCK_N (64-query tiles, 16-key tiles)."""
    bs, hkv, group, d = 6, 2, 2, 32
    q_lens = [7, 40, 1, 65]
    lens = [7 + 62, 40, 1 + 3, 65 + 16]
    kc, vc, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=9)
    q, qsl = make_queries(lens, q_lens, hkv * group, d, torch.float32, seed=9)
    kn, vn = new_rows(kc, tables, lens, q_lens), new_rows(vc, tables, lens, q_lens)
    kp, vp = poison_new_slots(kc, tables, lens, q_lens), poison_new_slots(vc, tables, lens, q_lens)
    mask = tree_mask(q_lens, random.Random(4)).to(DEV)
    want = oracle_prefill(q, kc, vc, tables, ctx, qsl, custom_mask=mask)
    assert_close(_extend_new_kv(mode, q, kp, vp, tables, ctx, qsl, kn, vn, mask), want, torch.float32, "tree")
    if mode != "reference":
        causal = oracle_prefill(q, kc, vc, tables, ctx, qsl)
        for block in ((64, 16), (16, 32)):
            out = _extend_new_kv(mode, q, kp, vp, tables, ctx, qsl, kn, vn, block=block)
            assert_close(out, causal, torch.float32, f"tiles {block}")


@needs_triton
def test_prefill_new_kv_strided_rows():
    """k_new as a strided view: no descriptor can describe it, so the rows are read with ordinary loads."""
    bs, hkv, group, d = 16, 2, 2, 32
    q_lens, lens = [20, 33], [20 + 5, 33]
    kc, vc, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=2)
    q, qsl = make_queries(lens, q_lens, hkv * group, d, torch.float32, seed=2)
    kn, vn = new_rows(kc, tables, lens, q_lens), new_rows(vc, tables, lens, q_lens)
    want = oracle_prefill(q, kc, vc, tables, ctx, qsl)
    wide = torch.randn(kn.shape[0], hkv, 2 * d, device=DEV)
    wide[:, :, ::2] = kn
    cfg = extend.ExtendConfig(32, 16, 4, 1, tma=True)
    out = extend.paged_prefill_attention_triton(q, kc, vc, tables, ctx, qsl, k_new=wide[:, :, ::2], v_new=vn,
                                                config=cfg)  # fmt: skip
    assert_close(out, want, torch.float32, "strided k_new")
    assert extend._descriptor(wide[:, :, ::2], 16, d) is None


@needs_triton
def test_prefill_causal_mask_equals_causal_and_decode():
    """A lower-triangular custom mask is the causal rule; a one-token extend is a decode step."""
    bs, hkv, group, d = 4, 1, 4, 32
    q_lens = [9, 1]
    lens = [9 + 6, 1 + 22]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=5)
    q, qsl = make_queries(lens, q_lens, hkv * group, d, torch.float32, seed=5)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = torch.zeros(10, 9, dtype=torch.bool)
    mask[:9] = causal
    mask[9, 0] = True
    a = K.paged_prefill_attention(q, k_cache, v_cache, tables, ctx, qsl, impl="triton")
    b = K.paged_prefill_attention(
        q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask.to(DEV), impl="triton"
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dec = K.paged_decode_attention(q[9:], k_cache, v_cache, tables[1:], ctx[1:], impl="triton")
    torch.testing.assert_close(a[9:], dec, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# dispatch and bad input
# ---------------------------------------------------------------------------------------------------


def small_case(dtype=torch.float32):
    k_cache, v_cache, tables, ctx = make_paged([5, 9], 4, 2, 16, dtype, device=torch.device("cpu"))
    q = torch.randn(2, 4, 16).to(dtype)
    return q, k_cache, v_cache, tables, ctx


def test_dispatch_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.resolve_impl("auto", cpu) == "reference"
    assert dispatch.resolve_impl("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.resolve_impl("cuda", cpu)
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_impl("triton", cpu)
    previous = K.get_default_impl()
    try:
        K.set_default_impl("reference")
        assert dispatch.resolve_impl(None, cpu) == "reference"
        with pytest.raises(ValueError):
            K.set_default_impl("fast")
    finally:
        K.set_default_impl(previous)


def test_dispatch_auto_uses_interpreter_when_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: True)
    assert dispatch.resolve_impl("auto", torch.device("cpu")) == "triton"


def test_bad_decode_input():
    q, kc, vc, bt, ctx = small_case()
    call = K.paged_decode_attention
    with pytest.raises(TypeError, match="q is torch.float16 but the KV cache is torch.float32"):
        call(q.half(), kc, vc, bt, ctx)
    with pytest.raises(TypeError, match="block_tables must be int32"):
        call(q, kc, vc, bt.float(), ctx)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        call(q.double(), kc.double(), vc.double(), bt, ctx)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, D\]"):
        call(q[0], kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(torch.randn(2, 3, 16), kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="head_dim"):
        call(torch.randn(2, 4, 32), kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        call(q[:1], kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="one shape"):
        call(q, kc, vc[:-1], bt, ctx)
    with pytest.raises(ValueError, match="is on meta"):
        call(q.to("meta"), kc, vc, bt, ctx)
    with pytest.raises(ValueError, match="num_splits"):
        call(q, kc, vc, bt, ctx, num_splits=0)
    with pytest.raises(ValueError, match="max_context_len"):
        call(q, kc, vc, bt, ctx, max_context_len=0)
    # Checks of values read tensors back (a sync on a GPU): only when asked for.
    with pytest.raises(ValueError, match=r"context_lens\[1\] = 0"):
        call(q, kc, vc, bt, torch.tensor([5, 0], dtype=torch.int32), validate=True)
    with pytest.raises(ValueError, match="more than the"):
        call(q, kc, vc, bt, torch.tensor([5, 10_000], dtype=torch.int32), validate=True)
    bad = bt.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="block id outside"):
        call(q, kc, vc, bad, ctx, validate=True)


def test_value_checks_for_the_whole_process(monkeypatch):
    """NEXUS_KERNEL_VALIDATE=1 turns the value checks on for every call."""
    q, kc, vc, bt, _ = small_case()
    zero = torch.tensor([5, 0], dtype=torch.int32)
    monkeypatch.setattr(dispatch, "_VALIDATE_ALWAYS", True)
    with pytest.raises(ValueError, match=r"context_lens\[1\] = 0"):
        K.paged_decode_attention(q, kc, vc, bt, zero)


def test_bad_write_and_prefill_input():
    q, kc, vc, bt, ctx = small_case()
    k = torch.randn(3, 2, 16)
    with pytest.raises(TypeError, match="cast them first"):
        K.write_kv_cache(k.half(), k.half(), kc, vc, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="outside"):
        K.write_kv_cache(k, k, kc, vc, torch.tensor([0, 1, kc.shape[0] * kc.shape[1]]), validate=True)
    with pytest.raises(ValueError, match="outside"):
        K.write_kv_cache(k, k, kc, vc, torch.tensor([0, -2, 1]), validate=True)
    with pytest.raises(ValueError, match="entries for 3 tokens"):
        K.write_kv_cache(k, k, kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[Hkv, D\]"):
        K.write_kv_cache(k[:, :1], k[:, :1], kc, vc, torch.tensor([0, 1, 2]))

    qq = torch.randn(6, 4, 16)
    qsl = torch.tensor([0, 2, 6], dtype=torch.int32)
    pre = K.paged_prefill_attention
    pre(qq, kc, vc, bt, ctx, qsl)  # fine
    with pytest.raises(ValueError, match="B \\+ 1"):
        pre(qq, kc, vc, bt, ctx, qsl[:2])
    with pytest.raises(ValueError, match="rise from 0"):
        pre(qq, kc, vc, bt, ctx, torch.tensor([0, 2, 5], dtype=torch.int32), validate=True)
    with pytest.raises(ValueError, match="counts the new tokens too"):
        pre(qq, kc, vc, bt, torch.tensor([1, 9], dtype=torch.int32), qsl, validate=True)
    with pytest.raises(TypeError, match="custom_mask must be bool"):
        pre(qq, kc, vc, bt, ctx, qsl, custom_mask=torch.ones(6, 4))
    with pytest.raises(ValueError, match="diagonal"):
        pre(qq, kc, vc, bt, ctx, qsl, custom_mask=torch.zeros(6, 4, dtype=torch.bool), validate=True)
    with pytest.raises(ValueError, match="columns"):
        pre(qq, kc, vc, bt, ctx, qsl, custom_mask=torch.ones(6, 2, dtype=torch.bool), validate=True)
    with pytest.raises(ValueError, match="max_query_len = 2"):
        pre(qq, kc, vc, bt, ctx, qsl, max_query_len=2, validate=True)
    with pytest.raises(ValueError, match="max_query_len must be"):
        pre(qq, kc, vc, bt, ctx, qsl, max_query_len=-1)

    kn = torch.randn(6, 2, 16)
    pre(qq, kc, vc, bt, ctx, qsl, k_new=kn, v_new=kn)  # fine
    with pytest.raises(ValueError, match="k_new was given without v_new"):
        pre(qq, kc, vc, bt, ctx, qsl, k_new=kn)
    with pytest.raises(ValueError, match="v_new was given without k_new"):
        pre(qq, kc, vc, bt, ctx, qsl, v_new=kn)
    with pytest.raises(ValueError, match=r"k_new must be \[total_q, Hkv, D\]"):
        pre(qq, kc, vc, bt, ctx, qsl, k_new=kn[:5], v_new=kn)
    with pytest.raises(ValueError, match=r"v_new must be \[total_q, Hkv, D\] = \[6, 2, 16\]"):
        pre(qq, kc, vc, bt, ctx, qsl, k_new=kn, v_new=torch.randn(6, 1, 16))
    with pytest.raises(ValueError, match=r"k_new must be \[total_q, Hkv, D\] \(packed like q\), got shape"):
        pre(qq, kc, vc, bt, ctx, qsl, k_new=kn.flatten(1), v_new=kn)
    with pytest.raises(ValueError, match="v_new is torch.float16 but the KV cache is torch.float32"):
        pre(qq, kc, vc, bt, ctx, qsl, k_new=kn, v_new=kn.half())
    with pytest.raises(ValueError, match="k_new is on meta"):
        pre(qq, kc, vc, bt, ctx, qsl, k_new=kn.to("meta"), v_new=kn)


class _NoHostReads(TorchFunctionMode):
    """Fails any call that would bring a tensor's values to the host (a sync on a GPU)."""

    FORBIDDEN = {"__bool__", "__int__", "__index__", "__float__", "__complex__", "item", "tolist", "numpy", "cpu",
                 "nonzero", "equal", "allclose", "__repr__", "__str__", "__format__"}  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            raise AssertionError(f"the default call read device values on the host: Tensor.{name}")
        return func(*args, **(kwargs or {}))


@needs_triton
def test_default_calls_read_nothing_back():
    """The public ops with their default flags, all the way to the kernel launches (recorded, not run: the
    interpreter itself reads values), under a mode that fails any host read of tensor values: the decode
    call on both schedules and split, the extend call without max_query_len (with and without k_new and
    a tree mask), the slot write. Each check of values is opt-in (validate=True), so this must stay clean."""
    from nexus_lessons.kernels.compile_check import record

    bs, hkv, group, d = 16, 2, 2, 32
    lens = [37, 5, 130]
    k_cache, v_cache, tables, ctx = make_paged(lens, bs, hkv, d, torch.float32, seed=1)
    q = torch.randn(len(lens), hkv * group, d, device=DEV)
    q_lens = [3, 5, 1]
    qx, qsl = make_queries(lens, q_lens, hkv * group, d, torch.float32, seed=1)
    kn = torch.randn(qx.shape[0], hkv, d, device=DEV)
    mask = torch.ones(qx.shape[0], 5, dtype=torch.bool, device=DEV)
    calls = {
        "decode": lambda: K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton"),
        "decode, split": lambda: K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton", num_splits=4),
        "decode, bounds": lambda: K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton",
                                                           max_context_len=130, mean_context_len=57.3),
        "extend": lambda: K.paged_prefill_attention(qx, k_cache, v_cache, tables, ctx, qsl, impl="triton"),
        "extend, k_new, tree": lambda: K.paged_prefill_attention(qx, k_cache, v_cache, tables, ctx, qsl, impl="triton",
                                                                 custom_mask=mask, k_new=kn, v_new=kn),
        "write": lambda: K.write_kv_cache(kn, kn, k_cache, v_cache, torch.arange(kn.shape[0], device=DEV), impl="triton"),
    }  # fmt: skip
    kernels_seen = set()
    for what, call in calls.items():
        with _NoHostReads():
            launches = record(call)
        assert launches, f"{what}: nothing was launched"
        kernels_seen |= {launch.kernel.__name__ for launch in launches}
    # the split kernel (both ways), stream-K (3 sequences of spread lengths), extend and write all ran
    assert {"_decode_split_kernel", "_decode_streamk_kernel", "_extend_kernel", "_write_kv_cache_kernel"} <= kernels_seen
    with pytest.raises(AssertionError, match="read device values"):  # the guard catches a host read
        with _NoHostReads():
            record(lambda: K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="triton", validate=True))


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks results, not compilation: compile the head-shape launches for sm_90 with
    Triton's real compiler (no GPU needed) and fail on errors or register spills."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "nexus_lessons.kernels.compile_check", "--quick"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    report = proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert "SPILLS" not in proc.stdout, report


def test_cached_launch_protocol(monkeypatch):
    """``launch.launch`` with a stand-in kernel and driver: a miss launches the normal way and keeps the
    compiled kernel's launcher; a hit calls it as Triton's JIT does (grid padded to 3, current stream, no
    launch metadata or hooks, then every parameter, defaults and ``meta`` constexprs last); a launch
    hook, or a launch that returns no compiled kernel, keeps every call on the normal path."""
    from types import SimpleNamespace as NS

    launch = pytest.importorskip("nexus_lessons.kernels.launch")
    if launch.knobs is None:
        pytest.skip("this Triton has no knobs: every launch takes the normal path")
    calls = []
    compiled = NS(run=lambda *a: calls.append(a), function="fn", packed_metadata="pm")

    class Kernel:
        params = [NS(name=n, default=d) for n, d in (("x", None), ("n", None), ("A", 7), ("B", 3))]

        def __init__(self, result):
            self.result = result

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append(("jit", grid, args, meta)) or self.result

    driver = NS(active=NS(get_current_device=lambda: 0, get_current_stream=lambda device: 99))
    monkeypatch.setattr(launch, "driver", driver)
    monkeypatch.setattr(launch, "_LAUNCHERS", {})
    jit = ("jit", (4, 2), ("x", 5), {"B": 1, "num_warps": 4})
    for _ in range(2):
        launch.launch(Kernel(compiled), (4, 2), ("k",), ("x", 5), {"B": 1, "num_warps": 4})
    assert calls == [jit, (4, 2, 1, 99, "fn", "pm", None, None, None, "x", 5, 7, 1)]
    calls.clear()
    hook = lambda *a: None
    launch.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch.launch(Kernel(compiled), (4, 2), ("k",), ("x", 5), {"B": 1, "num_warps": 4})
    finally:
        launch.knobs.runtime.launch_enter_hook.remove(hook)
    for _ in range(2):
        launch.launch(Kernel(None), (4, 2), ("other",), ("x", 5), {"B": 1, "num_warps": 4})
    assert calls == [jit] * 3


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernels at the benchmark's head shapes (Hq 32, Hkv 8, D 128, 16-token blocks)
# ---------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
def test_count_compiles_sees_a_compile_and_then_none():
    """The benchmarks' check that a timed run compiled nothing: a new kernel compiles once, then is cached."""
    import triton
    import triton.language as tl

    from nexus_lessons.bench.common import count_compiles

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x = torch.zeros(100, device=DEV)
    with count_compiles() as first:
        _add_one[(1,)](x, 100, BLOCK=128)
    with count_compiles() as second:
        _add_one[(1,)](x, 100, BLOCK=128)
    assert first == ["_add_one"] and second == [] and x.eq(2).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("splits", [None, 1, 7, 64])
def test_gpu_decode(dtype, splits):
    lens = random_lens(random.Random(1), 6, 16, 3000)
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, dtype, seed=11)
    q = torch.randn(len(lens), 32, 128, device=DEV).to(dtype)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=splits)
    assert_close(out, want, dtype, f"gpu decode splits={splits}")
    ref = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, impl="reference")
    assert_close(ref, want, dtype, "gpu reference")


@gpu
@needs_cuda
def test_gpu_decode_split_merge_and_graph():
    """bf16 at 1 x 32k-like splits: the merge by the last split to arrive (atomic arrival counter), called
    repeatedly (the counters must come back to 0 every time) and from a CUDA graph replay."""
    lens = [4099, 1, 2048, 777]
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, torch.bfloat16, seed=13)
    q = torch.randn(len(lens), 32, 128, device=DEV).bfloat16()
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    for splits in (2, 64, 128):
        outs = [K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=splits) for _ in range(3)]
        for o in outs:
            assert_close(o, want, torch.bfloat16, f"splits={splits}")
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.cuda.synchronize()
    assert not decode.merge_counters(DEV, len(lens) * 8).any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=64)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, want, torch.bfloat16, "graph replay")


@gpu
@needs_cuda
def test_gpu_decode_cached_launch():
    """The split kernel's cached launch (``launch.py``): repeated calls reuse one launcher; a q view that is
    not 16-byte aligned gets a launcher of its own; a bound that crosses multiples of 16 compiles nothing
    new; a CUDA graph captures the cached launch on its own stream. Every output against the reference."""
    from nexus_lessons.bench.common import count_compiles
    from nexus_lessons.kernels import launch

    lens = [4099, 1, 2047, 777]
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, torch.bfloat16, seed=29)
    q = torch.randn(len(lens), 32, 128, device=DEV).bfloat16()
    want = K.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx).double()

    def run(query, **kw):
        return K.paged_decode_attention(query, k_cache, v_cache, tables, ctx, num_splits=8, **kw)

    first = run(q)
    entries = len(launch._LAUNCHERS)
    for _ in range(3):
        assert torch.equal(run(q), first)
    assert len(launch._LAUNCHERS) == entries, "a repeated call must hit its launcher"
    assert_close(first, want, torch.bfloat16, "cached launch")

    flat = torch.empty(q.numel() + 1, device=DEV, dtype=q.dtype)
    unaligned = flat[1:].view(q.shape)  # 2 bytes past an aligned address
    unaligned.copy_(q)
    assert_close(run(unaligned), want, torch.bfloat16, "unaligned q")
    assert len(launch._LAUNCHERS) == entries + 1

    run(q, max_context_len=4330)  # compiles the host-split variant
    with count_compiles() as compiled:
        for bound in range(4330, 4370, 5):  # crosses 4336 and 4352; host pages 271 to 273
            assert_close(run(q, max_context_len=bound), want, torch.bfloat16, f"max_context_len={bound}")
    assert compiled == [], compiled

    entries = len(launch._LAUNCHERS)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(q)
    assert len(launch._LAUNCHERS) == entries, "the capture must take the cached launch"
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, want, torch.bfloat16, "graph replay of the cached launch")


@gpu
@needs_cuda
def test_gpu_decode_streamk():
    """bf16 at the head shapes, mixed lengths (1 to 5000, not multiples of 16): the one-wave stream-K grid
    and small grids that cut units into many pieces; repeated calls and a graph replay; the public call
    takes stream-K for lengths the caller says are spread."""
    lens = random_lens(random.Random(3), 37, 16, 5000) + [1, 16, 4096]
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, torch.bfloat16, seed=17)
    q = torch.randn(len(lens), 32, 128, device=DEV).bfloat16()
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    for programs in (None, 7, 100):
        outs = [sk.paged_decode_attention_streamk(q, k_cache, v_cache, tables, ctx, num_programs=programs)
                for _ in range(2)]  # fmt: skip
        assert_close(outs[0], want, torch.bfloat16, f"stream-K P={programs}")
        assert torch.equal(outs[0], outs[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.paged_decode_attention_streamk(q, k_cache, v_cache, tables, ctx)
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, want, torch.bfloat16, "stream-K graph replay")
    public = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx, max_context_len=max(lens),
                                      mean_context_len=sum(lens) / len(lens))  # fmt: skip
    assert_close(public, want, torch.bfloat16, "public call, spread lengths")


@gpu
@needs_cuda
def test_gpu_default_calls_never_sync():
    """With torch's sync debug mode set to error, the public ops with their defaults run without a single
    device-to-host synchronisation (a second call too: nothing is planned that needs one later)."""
    lens = [4099, 1, 2048, 777]
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, torch.bfloat16, seed=19)
    q = torch.randn(len(lens), 32, 128, device=DEV).bfloat16()
    q_lens = [300, 1, 129, 64]
    qx, qsl = make_queries(lens, q_lens, 32, 128, torch.bfloat16, seed=19)
    kn = torch.randn(qx.shape[0], 8, 128, device=DEV).bfloat16()
    slots = torch.arange(qx.shape[0], device=DEV)
    want = oracle_decode(q, k_cache, v_cache, tables, ctx)
    K.paged_decode_attention(q, k_cache, v_cache, tables, ctx)  # compile first: compiling may sync
    K.paged_prefill_attention(qx, k_cache, v_cache, tables, ctx, qsl, k_new=kn, v_new=kn)
    K.write_kv_cache(kn, kn, k_cache.clone(), v_cache.clone(), slots)
    torch.cuda.synchronize()
    k2, v2 = k_cache.clone(), v_cache.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = K.paged_decode_attention(q, k_cache, v_cache, tables, ctx)
            K.paged_prefill_attention(qx, k_cache, v_cache, tables, ctx, qsl, k_new=kn, v_new=kn)
            K.write_kv_cache(kn, kn, k2, v2, slots)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_close(out, want, torch.bfloat16, "decode under sync debug mode")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tree", [False, True])
def test_gpu_prefill(dtype, tree):
    q_lens = [300, 1, 129, 64]
    lens = [300 + 700, 1 + 33, 129, 64 + 5]
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, dtype, seed=12)
    q, qsl = make_queries(lens, q_lens, 32, 128, dtype, seed=12)
    mask = tree_mask(q_lens, random.Random(2)).to(DEV) if tree else None
    want = oracle_prefill(q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask)
    out = K.paged_prefill_attention(q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask)
    assert_close(out, want, dtype, f"gpu prefill tree={tree}")


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["tma", "pointer"])
@pytest.mark.parametrize("tree", [False, True])
def test_gpu_prefill_new_kv(mode, tree):
    """bf16 extend with k_new/v_new: the descriptor (TMA) path and the pointer path, new-token pages
    poisoned with NaN, against the oracle and against the paged-only kernel."""
    if mode == "tma":
        assert extend.tma_available(DEV) or torch.cuda.get_device_capability()[0] < 9, "Hopper but no descriptors"
    q_lens = [300, 1, 129, 64, 2048]
    lens = [300 + 700, 1 + 33, 129, 64 + 5, 2048]
    k_cache, v_cache, tables, ctx = make_paged(lens, 16, 8, 128, torch.bfloat16, seed=14)
    q, qsl = make_queries(lens, q_lens, 32, 128, torch.bfloat16, seed=14)
    kn, vn = new_rows(k_cache, tables, lens, q_lens), new_rows(v_cache, tables, lens, q_lens)
    mask = tree_mask(q_lens, random.Random(5)).to(DEV) if tree else None
    want = oracle_prefill(q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask)
    paged = K.paged_prefill_attention(q, k_cache, v_cache, tables, ctx, qsl, custom_mask=mask)
    kp, vp = poison_new_slots(k_cache, tables, lens, q_lens), poison_new_slots(v_cache, tables, lens, q_lens)
    base = extend.default_extend_config(torch.bfloat16, 128, DEV, tree)
    for cfg in (base, extend.ExtendConfig(128, 128, 8, 2), extend.ExtendConfig(128, 64, 4, 2)):
        cfg = replace(cfg, tma=mode == "tma")
        out = extend.paged_prefill_attention_triton(q, kp, vp, tables, ctx, qsl, None, mask, k_new=kn, v_new=vn,
                                                    config=cfg)  # fmt: skip
        assert_close(out, want, torch.bfloat16, f"gpu new_kv {cfg}")
        torch.testing.assert_close(out.double(), paged.double(), atol=TOL[torch.bfloat16], rtol=0)
    out = K.paged_prefill_attention(
        q, kp, vp, tables, ctx, qsl, custom_mask=mask, k_new=kn, v_new=vn
    )  # default
    assert_close(out, want, torch.bfloat16, "gpu new_kv public default")


@gpu
@needs_cuda
def test_gpu_write_kv_cache():
    k_cache, v_cache, _, _ = make_paged([64], 16, 8, 128, torch.bfloat16)
    k = torch.randn(5, 8, 128, device=DEV).bfloat16()
    slots = torch.tensor([3, -1, 40, 17, 0], device=DEV)
    K.write_kv_cache(k, k, k_cache, v_cache, slots)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_cache[s // 16, s % 16], k[i])
