"""The decode step's RoPE + K/V page write kernel against float64 and the unfused ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nexus_lessons.cuda_graph import CUDAGraphDecoder, GraphKVCache
from nexus_lessons.generate import generate
from nexus_lessons.kernels.rope import rope_and_cache, rope_and_cache_ref

CHECK = """
import torch
from nexus_lessons.kernels.rope import launch, rope_and_cache_ref
g = torch.Generator().manual_seed(0)

def tables(pos, D, dtype):
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).double() / D)
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

for dtype, tol in [(torch.float32, 1e-6), (torch.float16, 2e-3)]:
    for B, Hq, Hkv, D in [(1, 4, 2, 8), (3, 6, 2, 12), (2, 8, 8, 64), (5, 4, 1, 6)]:
        width = (Hq + 2 * Hkv) * D
        qkv = (torch.randn(B, width + 5, generator=g) * 3).to(dtype)  # slices of a wider row, as from a split
        q, k, v = qkv[:, : Hq * D], qkv[:, Hq * D : (Hq + Hkv) * D], qkv[:, (Hq + Hkv) * D : width]
        cos, sin = tables(torch.randint(0, 5000, (B,), generator=g).double(), D, dtype)
        n = 13
        k_pages, v_pages = torch.randn(n, Hkv, D, generator=g).to(dtype), torch.randn(n, Hkv, D, generator=g).to(dtype)
        k64, v64, k_ref, v_ref = k_pages.double(), v_pages.double(), k_pages.clone(), v_pages.clone()
        slots = torch.randperm(n, generator=g)[:B]
        got = launch(q, k, v, cos, sin, k_pages, v_pages, slots)
        d = lambda t: t.double()
        want = rope_and_cache_ref(d(q), d(k), d(v), d(cos), d(sin), k64, v64, slots)
        unfused = rope_and_cache_ref(q, k, v, cos, sin, k_ref, v_ref, slots)
        assert got.shape == (B, Hq, D) and got.dtype == dtype
        for mine, ops, truth in ((got, unfused, want), (k_pages, k_ref, k64)):
            err = (mine.double() - truth).abs().max().item()
            assert err < tol * truth.abs().max().item(), (dtype, B, Hq, Hkv, D, err)
            if dtype == torch.float16:  # rounded once, the kernel is no further from the truth than the ops
                assert err <= (ops.double() - truth).abs().max().item() * 1.01, (B, D, err)
        assert torch.equal(v_pages, v_ref), "v must be copied bit for bit"
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[slots] = False
        assert torch.equal(k_pages[untouched], k_ref[untouched]), "a slot outside `slots` was written"
print("ok")
"""


def test_kernel_matches_float64_and_the_unfused_ops_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def _args(B=2, Hq=4, Hkv=2, D=8, n=6):
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, Hq * D, generator=g), torch.randn(B, Hkv * D, generator=g), torch.randn(B, Hkv * D, generator=g)
    cos, sin = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, k_pages=torch.zeros(n, Hkv, D), v_pages=torch.zeros(n, Hkv, D),
                slots=torch.tensor([4, 1]))


def test_cpu_path_is_the_reference():
    a, b = _args(), _args()
    got = rope_and_cache(**a)
    want = rope_and_cache_ref(**b)
    assert torch.equal(got, want) and torch.equal(a["k_pages"], b["k_pages"]) and torch.equal(a["v_pages"], b["v_pages"])
    assert a["k_pages"][[0, 2, 3, 5]].abs().sum() == 0


def test_reference_rotates_as_the_model_does():
    """The kernel's reference keeps its own copy of the rotation (kernels import no model code): it must
    equal the model's apply_rope bit for bit."""
    from nexus_lessons.model import apply_rope

    a = _args(B=3, Hq=6, Hkv=2, D=8, n=7)
    a["slots"] = torch.tensor([4, 1, 6])
    B, D = 3, 8
    q_rot = rope_and_cache_ref(**a)
    c, s = a["cos"][:, None], a["sin"][:, None]
    assert torch.equal(q_rot, apply_rope(a["q"].reshape(B, -1, 1, D), c, s)[:, :, 0])
    k_rot = apply_rope(a["k"].reshape(B, 2, 1, D), c, s)[:, :, 0]
    assert torch.equal(a["k_pages"][a["slots"]], k_rot)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(slots=torch.tensor([1, 2], dtype=torch.int32)), "slots"),
        (dict(k=torch.randn(2, 15)), "k must be"),
        (dict(cos=torch.randn(2, 9)), "cos must be"),
        (dict(q=torch.randn(2, 30)), "q must be"),
        (dict(v_pages=torch.zeros(6, 2, 8).transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
        (dict(v=torch.randn(2, 16).half()), "one dtype"),
    ],
)
def test_bad_arguments_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        rope_and_cache(**{**_args(), **change})


def test_fused_rope_needs_the_paged_layout():
    with pytest.raises(ValueError, match="attention='paged'"):
        GraphKVCache(2, 1, 16, 2, 8, attention="sdpa", fused_rope=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_decoder_with_the_kernel_generates_what_the_plain_model_does():
    from nexus_lessons.loading import load_model

    model, _ = load_model("nexus-tiny", device="cuda", tokenizer=False)
    ids = torch.tensor([[5, 17, 300, 2048, 77, 9]], device="cuda")
    plain = generate(model, ids, 40)
    model.fuse_projections(fused_gemv=True)
    for compile in (False, True):
        dec = CUDAGraphDecoder(model, 1, 64, attention="paged", fused_rope=True, compile=compile)
        assert torch.equal(dec.generate(ids, 40), plain), compile
    a = {k: v.cuda().bfloat16() if v.is_floating_point() else v.cuda() for k, v in _args(B=2, Hq=32, Hkv=8, D=64, n=9).items()}
    d = {k: v.double() if v.is_floating_point() else v.clone() for k, v in a.items()}
    got = rope_and_cache(**a)
    want = rope_and_cache_ref(**d)
    for mine, truth in ((got, want), (a["k_pages"], d["k_pages"])):
        assert (mine.double() - truth).abs().max() < 1e-2 * truth.abs().max()
    assert torch.equal(a["v_pages"].double(), d["v_pages"])
