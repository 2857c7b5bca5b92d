"""RMSNorm and SiLU-and-mul, each one Triton kernel on CUDA, beside the PyTorch ops they stand for.

Why: written in PyTorch, an RMSNorm is seven kernels (cast up, square, mean, add and rsqrt, multiply,
cast down, scale) and a gated MLP's activation two more over strided halves. In a serving step of a few
hundred tokens each of them moves a megabyte or two, so their time is launches and tails: in the serving
benchmark's batch-256 decode step of a 16-layer model these ~250 kernels took a sixth of the GPU time
(notes/engine.md). One program per token row does the whole op in registers.

Both kernels round where the PyTorch ops round (the normalised row to the input dtype before the weight,
silu(gate) before the product), so they differ from the references only where the order of one float32
sum or the hardware exp tips a rounding. On CUDA the model runs the kernels; elsewhere, the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalise in float32, round to the input dtype, multiply by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] holding [gate | up] -> silu(gate) * up [..., N]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


_kernels: dict[str, object] = {}


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(X, W, Y, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
        """Program (row): y = w * round(x / rms(x))."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        normed = (x * r).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Y, N, stride_x, stride_y, BLOCK: tl.constexpr):
        """Program (row, column block): y = round(silu(gate)) * up."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (silu * up).to(Y.dtype.element_ty), mask=mask)

    _kernels.update(rms_norm=_rms_norm_kernel, silu_and_mul=_silu_and_mul_kernel)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [M, N] with unit column stride; weight [N]."""
    import triton

    if not _kernels:
        _build()
    M, N = x.shape
    y = torch.empty(M, N, device=x.device, dtype=torch.result_type(weight, x))
    block = triton.next_power_of_2(N)
    _kernels["rms_norm"][(M,)](x, weight, y, N, x.stride(0), y.stride(0), eps, BLOCK=block, num_warps=_warps(block))
    return y


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x [M, 2N] with unit column stride."""
    import triton

    if not _kernels:
        _build()
    M, N = x.shape[0], x.shape[1] // 2
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block = min(triton.next_power_of_2(N), 4096)
    _kernels["silu_and_mul"][(M, triton.cdiv(N, block))](x, y, N, x.stride(0), y.stride(0), BLOCK=block,
                                                         num_warps=_warps(block))  # fmt: skip
    return y


@torch.library.custom_op("nexus_lessons::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Opaque to torch.compile and CUDA-graph safe, like the GEMV."""
    return rms_norm_triton(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.result_type(weight, x))


@torch.library.custom_op("nexus_lessons::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_triton(x)


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: the kernel for a non-empty CUDA tensor, the reference otherwise."""
    if not (x.is_cuda and weight.is_cuda and x.numel()):
        return rms_norm_ref(x, weight, eps)
    return _rms_norm_op(_rows(x), weight, float(eps)).view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [..., 2N] = [gate | up]: the kernel for a non-empty CUDA tensor, else the reference."""
    if not (x.is_cuda and x.numel()):
        return silu_and_mul_ref(x)
    return _silu_and_mul_op(_rows(x)).view(*x.shape[:-1], x.shape[-1] // 2)
