"""The fused silu(gate) * up kernel against a float64 reference (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nexus_lessons.kernels.activation import silu_and_mul, silu_and_mul_ref

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
print("ok")
"""


def test_kernel_matches_float64_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_cpu_path_is_the_reference_and_bad_width_is_refused():
    x = torch.randn(4, 10)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7))


def test_fused_activation_in_the_model_changes_nothing(tiny_model):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_model(ids)
        got = tiny_model.fuse_projections(fused_activation=True)(ids)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_on_gpu():
    x = torch.randn(3, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    ref = silu_and_mul_ref(x.double())
    assert ((silu_and_mul(x).double() - ref).norm() / ref.norm()) < 1e-2
