"""SwiGLU's activation, silu(gate) * up, as one kernel over the fused gate/up projection's output.

Why a kernel for two element-wise ops: at batch 1, torch.compile turns the down projection into a
matrix-vector reduction and inlines silu(gate) * up into it, so every one of its 2048 output rows
recomputes all 8192 activations. Computing them once, in a kernel the compiler cannot inline (a
`triton_op`), makes the down projection a plain read of its weights. vLLM ships the same op
(SiluAndMul) for the same reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] holding [gate | up] -> silu(gate) * up [..., N]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


_silu_and_mul_op = None


def _build_op():
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton_op("nexus_lessons::silu_and_mul", mutates_args=())
    def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1] // 2
        rows = x.reshape(-1, 2 * n)
        out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
        block = 1024
        grid = (rows.shape[0], triton.cdiv(n, block))
        wrap_triton(_silu_and_mul_kernel)[grid](rows, out, n, rows.stride(0), out.stride(0), BLOCK=block)
        return out.reshape(*x.shape[:-1], n)

    return silu_and_mul_triton


def build() -> None:
    """Define and register the op now (torch.compile must not trace its first definition)."""
    global _silu_and_mul_op
    if _silu_and_mul_op is None:
        _silu_and_mul_op = _build_op()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on CUDA tensors, the reference elsewhere."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dimension must hold [gate | up], an even size; got {x.shape[-1]}")
    if not x.is_cuda:
        return silu_and_mul_ref(x)
    build()
    return _silu_and_mul_op(x.contiguous())
