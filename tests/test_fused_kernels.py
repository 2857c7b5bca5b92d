"""The fused silu(gate) * up and RMSNorm kernels against float64 references (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nexus_lessons.kernels.activation import silu_and_mul, silu_and_mul_ref
from nexus_lessons.kernels.norm import rms_norm, rms_norm_ref

CHECK = """
import torch
from nexus_lessons.kernels.activation import _build_op, silu_and_mul_ref
op = _build_op()
g = torch.Generator().manual_seed(0)
for dtype, tol in [(torch.float32, 1e-6), (torch.float16, 2e-3)]:
    for shape in [(1, 2 * 1500), (3, 5, 2 * 37), (2, 2 * 2048)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        ref = silu_and_mul_ref(x.double())
        out = op(x)
        assert out.dtype == dtype and out.shape == ref.shape, (out.shape, ref.shape)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (dtype, shape, err)
from nexus_lessons.kernels.norm import _build_op as build_norm
norm = build_norm()
for dtype, tol in [(torch.float32, 1e-6), (torch.float16, 2e-3)]:
    for shape in [(1, 2048), (3, 5, 200), (2, 37)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=g).to(dtype)
        xd = x.double()
        ref = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
        out = norm(x, w, 1e-5)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert out.dtype == dtype and err < tol, (dtype, shape, err)
print("ok")
"""


def test_kernels_match_float64_references_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_cpu_path_is_the_reference_and_bad_width_is_refused():
    x = torch.randn(4, 10)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7))


def test_norm_cpu_path_is_the_reference_and_bad_weight_is_refused():
    x, w = torch.randn(4, 10), torch.randn(10)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(x, torch.randn(9), 1e-6)


def test_fused_kernels_in_the_model_change_nothing(tiny_model):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_model(ids)
        got = tiny_model.fuse_projections(fused_activation=True, fused_norm=True)(ids)
        assert tiny_model.norm.kernel is not None and tiny_model.layers[0].mlp.act_fn is not None
        tiny_model.unfuse_projections()
        assert tiny_model.norm.kernel is None
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_on_gpu():
    x = torch.randn(3, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    ref = silu_and_mul_ref(x.double())
    assert ((silu_and_mul(x).double() - ref).norm() / ref.norm()) < 1e-2
    h, w = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16), torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    ref = rms_norm_ref(h.double(), w.double(), 1e-5)
    assert ((rms_norm(h, w, 1e-5).double() - ref).norm() / ref.norm()) < 1e-2
