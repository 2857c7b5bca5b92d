"""The experimental TMA decode kernel (``paged_decode_tma``) against the reference and a float64 oracle.

Without a GPU the kernels run under the Triton interpreter, which emulates tensor-descriptor loads: this
module turns it on just long enough to build them (as tests/test_kernels.py does), then restores
TRITON_INTERPRET. Unused slots of every sequence's last page and every unused block-table entry hold NaN,
so a kernel that lets a masked key through returns NaN.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import nexus_lessons.kernels.paged_attention as pa
        import nexus_lessons.kernels.paged_decode_tma as tma
    except ImportError:  # no triton at all
        pa = tma = None
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
else:
    import nexus_lessons.kernels.paged_attention as pa
    import nexus_lessons.kernels.paged_decode_tma as tma

from nexus_lessons.kernels import paged_decode_attention_ref  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# Interpreted only if both modules were built by it (another module may have imported them compiled first).
TRITON_OK = tma is not None and (HAS_CUDA or (pa.interpreting() and type(tma._tma_decode_split_kernel).__name__
                                                                     == "InterpretedFunction"))  # fmt: skip
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="Triton unavailable, or imported before TRITON_INTERPRET=1"
)
needs_tma = pytest.mark.skipif(not (TRITON_OK and pa.tma_available(DEV)), reason="no tensor descriptors here")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _interpret_while_running(monkeypatch):
    """Triton reads TRITON_INTERPRET again while interpreted kernels run (lazy imports of its helpers)."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_pool(
    lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int, page: int = 16
):
    """Shuffled pages of random K/V; the slots past each sequence's end and a spare poison block hold NaN,
    and the block tables' unused columns point at the poison block."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + page - 1) // page for n in lens]
    num_blocks = sum(need) + 3
    shape = (num_blocks, page, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    poison = num_blocks - 1
    ids = torch.randperm(num_blocks - 1, generator=g)
    tables = torch.full((len(lens), max(need) + 2), poison, dtype=torch.int32)
    at = 0
    for b, (n, pages) in enumerate(zip(lens, need)):
        tables[b, :pages] = ids[at : at + pages].to(torch.int32)
        at += pages
        for cache in (k_cache, v_cache):
            cache[ids[at - 1], n - (pages - 1) * page :] = float("nan")  # the last page's unused slots
    for cache in (k_cache, v_cache):
        cache[poison] = float("nan")
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return k_cache.to(DEV), v_cache.to(DEV), tables.to(DEV), lens_t.to(DEV)


def oracle(q, k_cache, v_cache, tables, lens, scale):
    """float64 attention of each sequence's one query over its gathered keys: [B, Hq, D]."""
    page = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = []
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n, device=q.device)
        blocks = tables[b].long()[pos // page]
        k = k_cache[blocks, pos % page].double().repeat_interleave(group, 1)  # [n, Hq, D]
        v = v_cache[blocks, pos % page].double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(out)


def lengths(seed: int, batch: int, top: int) -> list[int]:
    """1, exact page multiples, and lengths that end mid-page."""
    rng = random.Random(seed)
    lens = [1, 32, 64] + [rng.randint(2, top) for _ in range(batch - 3)]
    lens = [n + 3 if i >= 3 and n % 16 == 0 else n for i, n in enumerate(lens)]
    rng.shuffle(lens)
    return lens


def check(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (a masked slot got through)"
    err = (out.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype], f"{what}: max abs error {err:.3g} > {TOL[dtype]}"


@needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("splits", [None, 1, 3, 7])
@pytest.mark.parametrize("pages_per_iter, prefetch_ids", [(1, False), (2, False), (1, True), (2, True)])
def test_tma_decode_matches_reference_and_oracle(dtype, group, splits, pages_per_iter, prefetch_ids):
    lens = lengths(group * 10 + pages_per_iter, 6, 150)
    hkv, d = 2, 32
    k_cache, v_cache, tables, ctx = make_pool(lens, hkv, d, dtype, seed=group + 7 * pages_per_iter)
    q = torch.randn(len(lens), hkv * group, d, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    scale = 0.3
    out = tma.paged_decode_attention_tma(q, k_cache, v_cache, tables, ctx, scale, num_splits=splits,
                                         pages_per_iter=pages_per_iter, num_stages=2, prefetch_ids=prefetch_ids)  # fmt: skip
    what = (
        f"{dtype} group={group} splits={splits} pages_per_iter={pages_per_iter} prefetch_ids={prefetch_ids}"
    )
    check(out, oracle(q, k_cache, v_cache, tables, ctx, scale), dtype, what + " vs oracle")
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, scale)
    check(out, ref, dtype if dtype == torch.float32 else torch.bfloat16, what + " vs reference")


@needs_tma
def test_tma_decode_default_scale_strided_pool_and_more_splits_than_pages():
    """A pool sliced out of a wider one (KV heads 2-3 of 4: a larger row stride and an offset base), the
    default scale, and 7 splits over 1-3 pages (most splits empty: lse -inf in the merge)."""
    lens = [1, 17, 40]
    k_wide, v_wide, tables, ctx = make_pool(lens, 4, 16, torch.float32, seed=5)
    k_cache, v_cache = k_wide[:, :, 2:], v_wide[:, :, 2:]  # [blocks, 16, 2, 16], strides (1024, 64, 16, 1)
    q = torch.randn(3, 4, 16).to(DEV)
    want = oracle(q, k_cache, v_cache, tables, ctx, 16**-0.5)
    for splits in (None, 7):
        out = tma.paged_decode_attention_tma(
            q, k_cache, v_cache, tables, ctx, num_splits=splits, num_stages=1
        )
        check(out, want, torch.float32, f"strided pool splits={splits}")


@needs_tma
def test_tma_decode_bfloat16():
    """bf16 (dot operands upcast under the interpreter, which has no bf16 dot), both page-id modes."""
    lens = [1, 40, 100]
    k_cache, v_cache, tables, ctx = make_pool(lens, 2, 32, torch.bfloat16, seed=1)
    q = torch.randn(3, 8, 32).bfloat16().to(DEV)
    want = oracle(q, k_cache, v_cache, tables, ctx, 32**-0.5)
    for prefetch in (False, True):
        out = tma.paged_decode_attention_tma(
            q,
            k_cache,
            v_cache,
            tables,
            ctx,
            num_splits=3,
            pages_per_iter=2,
            prefetch_ids=prefetch,
            num_stages=2,
        )
        check(out, want, torch.bfloat16, f"bf16 prefetch_ids={prefetch}")


@needs_tma
def test_tma_decode_rejects_what_a_descriptor_cannot_describe():
    k_cache, v_cache, tables, ctx = make_pool([20], 2, 32, torch.float32, seed=1)
    q = torch.randn(1, 4, 32).to(DEV)
    call = tma.paged_decode_attention_tma
    with pytest.raises(ValueError, match="pages back to back"):
        call(q, k_cache[::2], v_cache[::2], tables // 2, ctx)
    odd_k, odd_v, _, _ = make_pool([20], 2, 48, torch.float32, seed=1)
    with pytest.raises(ValueError, match="no TMA descriptor"):  # D = 48: not a power of 2
        call(torch.randn(1, 4, 48).to(DEV), odd_k, odd_v, tables, ctx)
    with pytest.raises(ValueError, match="no TMA descriptor"):  # every other KV head: heads not adjacent
        call(q[:, :2], k_cache[:, :, ::2], v_cache[:, :, ::2], tables, ctx)
    with pytest.raises(ValueError, match="no TMA descriptor"):  # each row's D values not contiguous
        call(q, k_cache.transpose(2, 3).contiguous().transpose(2, 3), v_cache, tables, ctx)
    with pytest.raises(ValueError, match="share a dtype"):
        call(q.half(), k_cache, v_cache, tables, ctx)
    small_k, small_v, small_t, _ = make_pool([20], 2, 32, torch.float32, seed=1, page=8)
    with pytest.raises(ValueError, match="block size"):
        call(q, small_k, small_v, small_t, ctx)
    with pytest.raises(ValueError, match="num_splits"):
        call(q, k_cache, v_cache, tables, ctx, num_splits=0)
    with pytest.raises(ValueError, match="pages_per_iter"):
        call(q, k_cache, v_cache, tables, ctx, pages_per_iter=3, prefetch_ids=True)


@needs_tma
def test_tma_decode_matches_the_pointer_kernel():
    """Same splits, same merge: the TMA and the pointer-gather kernels agree to rounding."""
    lens = lengths(4, 5, 200)
    k_cache, v_cache, tables, ctx = make_pool(lens, 2, 32, torch.float32, seed=9)
    q = torch.randn(len(lens), 8, 32).to(DEV)
    for splits in (1, 3):
        b = pa.paged_decode_attention_triton(q, k_cache, v_cache, tables, ctx, num_splits=splits)
        for ppi in (1, 3):  # 3: not a power of 2, fine without prefetch_ids
            a = tma.paged_decode_attention_tma(q, k_cache, v_cache, tables, ctx, num_splits=splits,
                                               pages_per_iter=ppi, num_stages=1)  # fmt: skip
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_tma_decode_compiles_for_sm90_without_a_gpu():
    """The interpreter checks results, not compilation: compile the bf16 head-shape launches for sm_90 with
    Triton's real compiler (no GPU needed) and fail on errors or register spills."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nexus_lessons.kernels.compile_check_tma", "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    report = proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert "SPILLS" not in proc.stdout, report


# ---------------------------------------------------------------------------------------------------
# GPU: compiled, bf16, the benchmark's head shapes (Hq 32, Hkv 8, D 128, 16-token blocks)
# ---------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("splits", [None, 1, 7, 64])
@pytest.mark.parametrize("pages_per_iter", [1, 2, 4])
def test_gpu_tma_decode_bf16(splits, pages_per_iter):
    assert pa.tma_available(DEV) or torch.cuda.get_device_capability()[0] < 9, "Hopper but no descriptors"
    if not pa.tma_available(DEV):
        pytest.skip("tensor descriptors need compute capability >= 9")
    lens = lengths(splits or 0, 6, 3000)
    k_cache, v_cache, tables, ctx = make_pool(lens, 8, 128, torch.bfloat16, seed=11)
    q = torch.randn(len(lens), 32, 128, device=DEV).bfloat16()
    want = oracle(q, k_cache, v_cache, tables, ctx, 128**-0.5)
    for stages in (3, 4, 6):
        for prefetch in (False, True):
            out = tma.paged_decode_attention_tma(q, k_cache, v_cache, tables, ctx, num_splits=splits,
                                                 pages_per_iter=pages_per_iter, num_stages=stages,
                                                 prefetch_ids=prefetch)  # fmt: skip
            check(
                out,
                want,
                torch.bfloat16,
                f"gpu bf16 splits={splits} pages_per_iter={pages_per_iter} stages={stages} prefetch_ids={prefetch}",
            )
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tma.paged_decode_attention_tma(q, k_cache, v_cache, tables, ctx, num_splits=splits,
                                             pages_per_iter=pages_per_iter, prefetch_ids=True)  # fmt: skip
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    check(out, want, torch.bfloat16, "gpu bf16 graph replay")
