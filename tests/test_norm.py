"""The RMSNorm and SiLU-and-mul kernels against float64 and the PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch

from nexus_lessons.kernels.norm import rms_norm, rms_norm_ref, silu_and_mul, silu_and_mul_ref

CHECK = """
import torch
from nexus_lessons.kernels.norm import rms_norm_ref, rms_norm_triton, silu_and_mul_ref, silu_and_mul_triton
g = torch.Generator().manual_seed(0)
for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]:
    for M, N in [(1, 37), (3, 100), (5, 300), (2, 5000)]:  # widths off the power-of-two blocks, one split
        x = (torch.randn(M, N + 7, generator=g) * 3).to(dtype)[:, 3:N + 3]  # a row stride that is not N
        w = (1 + torch.randn(N, generator=g) / 4).to(dtype)
        got = rms_norm_triton(x, w, 1e-5)
        want64 = rms_norm_ref(x.double(), w.double(), 1e-5)
        ops = rms_norm_ref(x, w, 1e-5)
        assert got.dtype == ops.dtype and got.shape == (M, N)
        assert ((got.double() - want64).norm() / want64.norm()).item() < tol, ("rms_norm", dtype, M, N)
        assert (got.double() - ops.double()).abs().max() <= 2 * ops.double().abs().max() * tol, ("rms_norm ops", dtype)
        gu = (torch.randn(M, 2 * N + 5, generator=g) * 3).to(dtype)[:, :2 * N]
        got = silu_and_mul_triton(gu)
        want64 = silu_and_mul_ref(gu.double())
        ops = silu_and_mul_ref(gu)
        assert got.dtype == dtype and got.shape == (M, N)
        assert ((got.double() - want64).norm() / want64.norm()).item() < tol, ("silu_and_mul", dtype, M, N)
        assert (got.double() - ops.double()).abs().max() <= 2 * ops.double().abs().max() * tol, ("silu ops", dtype)
print("ok")
"""


def test_kernels_match_float64_and_the_pytorch_ops_under_the_interpreter(interpreted):
    interpreted(CHECK)


def test_cpu_path_is_the_pytorch_ops():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 24, generator=g), torch.randn(24, generator=g)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    gu = torch.randn(2, 3, 48, generator=g)
    gate, up = gu.chunk(2, -1)
    assert torch.equal(silu_and_mul(gu), torch.nn.functional.silu(gate) * up)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernels_match_the_pytorch_ops_and_capture_in_a_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 257, 2048, device="cuda", generator=g) * 3).to(dtype)
        w = (1 + torch.randn(2048, device="cuda", generator=g) / 4).to(dtype)
        gu = (torch.randn(2, 257, 2 * 8192, device="cuda", generator=g) * 3).to(dtype)
        ops_n, ops_s = rms_norm_ref(x, w, 1e-5), silu_and_mul_ref(gu)
        got_n, got_s = rms_norm(x, w, 1e-5), silu_and_mul(gu)
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -20  # one rounding of the output dtype, relative
        assert ((got_n - ops_n).abs() <= ops_n.abs() * ulp + 1e-6).all()
        assert ((got_s - ops_s).abs() <= ops_s.abs() * ulp + 1e-6).all()
        if dtype == torch.bfloat16:  # and few elements round differently from the PyTorch ops
            assert (got_n != ops_n).float().mean() < 0.01 and (got_s != ops_s).float().mean() < 0.01
    graph, out = torch.cuda.CUDAGraph(), None
    rms_norm(x, w, 1e-5)
    with torch.cuda.graph(graph):
        out = rms_norm(x, w, 1e-5)
    x.normal_()
    graph.replay()
    assert torch.equal(out, rms_norm(x, w, 1e-5))
