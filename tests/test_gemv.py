"""The batch-1 GEMV kernel (norm / silu_and_mul / residual folded in) against float64 and the unfused ops."""

from __future__ import annotations

import pytest
import torch

from nexus_lessons.generate import generate
from nexus_lessons.kernels.gemv import fused_linear, fused_linear_ref
from nexus_lessons.loading import load_model

CHECK = """
import torch
from nexus_lessons.kernels.gemv import launch, fused_linear_ref
g = torch.Generator().manual_seed(0)
cases = [  # N, K (not multiples of the tiles), rows, bias, norm, silu_mul, residual, tile
    (37, 100, 1, False, True, False, False, (8, 32, 4, 1)),
    (50, 70, 2, True, False, False, True, (16, 64, 4, 2)),
    (33, 45, 3, False, False, True, True, (8, 16, 2, 1)),
    (64, 128, 1, True, True, False, True, (4, 128, 4, 1)),
    (19, 64, 1, False, False, False, False, (32, 256, 4, 1)),
    (40, 300, 1, False, True, True, True, (1, 128, 4, 1)),
    (29, 90, 4, True, True, False, True, (8, 32, 4, 1)),  # MAX_ROWS rows sharing each row block
]
for dtype, tol in [(torch.float32, 2e-6), (torch.float16, 4e-3)]:
    for N, K, M, bias, norm, silu, res, tile in cases:
        x = (torch.randn(M, 2 * K if silu else K, generator=g) * 2).to(dtype)
        w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        nw = (1 + torch.randn(K, generator=g) / 4).to(dtype) if norm else None
        r = torch.randn(M, N, generator=g).to(dtype) if res else None
        out = launch(x, w, b, nw, 1e-5, silu, r, config=tile)
        # float64 truth of the same math, and the unfused ops in the kernel's dtype
        d = lambda t: None if t is None else t.double()
        want64 = fused_linear_ref(d(x), d(w), d(b), norm_weight=d(nw), eps=1e-5, silu_mul=silu, residual=d(r))
        unfused = fused_linear_ref(x, w, b, norm_weight=nw, eps=1e-5, silu_mul=silu, residual=r)
        assert out.dtype == dtype and out.shape == (M, N)
        err = ((out.double() - want64).norm() / want64.norm()).item()
        assert err < tol, (dtype, N, K, err)
        if dtype == torch.float16:  # the fused kernel rounds no more often than the unfused ops
            err_u = ((unfused.double() - want64).norm() / want64.norm()).item()
            assert err <= err_u * 1.05, (N, K, err, err_u)
print("ok")
"""


def test_kernel_matches_float64_and_the_unfused_ops_under_the_interpreter(interpreted):
    interpreted(CHECK)


def test_cpu_path_is_the_unfused_ops():
    g = torch.Generator().manual_seed(1)
    x, w, r = torch.randn(1, 3, 2 * 24, generator=g), torch.randn(10, 24, generator=g), torch.randn(1, 3, 10, generator=g)
    got = fused_linear(x, w, silu_mul=True, residual=r)
    gate, up = x.chunk(2, -1)
    assert torch.equal(got, r + torch.nn.functional.silu(gate) * up @ w.T)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(1, 7), w=torch.randn(3, 3), silu_mul=True), "even width"),
        (dict(x=torch.randn(1, 8), w=torch.randn(3, 5)), "inputs of width 8"),
        (dict(x=torch.randn(1, 8), w=torch.randn(3, 8), norm_weight=torch.randn(5)), "norm_weight"),
    ],
)
def test_bad_shapes_are_named(kwargs, match):
    x, w = kwargs.pop("x"), kwargs.pop("w")
    with pytest.raises(ValueError, match=match):
        fused_linear(x, w, **kwargs)


def test_fused_gemv_model_generates_what_the_plain_model_does():
    model, _ = load_model("nexus-tiny", tokenizer=False)
    ids = torch.tensor([[5, 17, 300, 2048, 77, 9]])
    plain = generate(model, ids, 24)  # no cache, unfused: the reference
    model.fuse_projections(fused_gemv=True)
    try:
        assert torch.equal(generate(model, ids, 24, cache="static"), plain)
        logits = model(ids)
    finally:
        model.unfuse_projections()
    assert torch.allclose(logits, model(ids), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_path_generates_what_the_plain_model_does():
    from nexus_lessons.cuda_graph import CUDAGraphDecoder

    model, _ = load_model("nexus-tiny", device="cuda", tokenizer=False)
    ids = torch.tensor([[5, 17, 300, 2048, 77, 9]], device="cuda")
    plain = generate(model, ids, 32)
    model.fuse_projections(fused_gemv=True)
    assert torch.equal(generate(model, ids, 32, cache="static"), plain)
    assert torch.equal(CUDAGraphDecoder(model, 1, 64).generate(ids, 32), plain)
    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K, silu in [(3072, 2048, False), (2048, 8192, True), (300, 77, False)]:
        x = torch.randn(1, 2 * K if silu else K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
        r = torch.randn(1, N, device="cuda", generator=g).bfloat16()
        got = fused_linear(x, w, silu_mul=silu, residual=r)
        want = fused_linear_ref(x.double(), w.double(), silu_mul=silu, residual=r.double())
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
