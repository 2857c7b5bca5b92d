"""RMSNorm as one kernel the compiler cannot inline.

Why: at batch 1, torch.compile turns each projection into a matrix-vector reduction and inlines the
RMSNorm that feeds it, so every output row of the qkv, gate_up and lm_head projections recomputes the
norm of the whole hidden vector (32000 times for the lm_head). Normalising once, in a `triton_op`,
leaves the projections a plain read of their weights. Numerics follow transformers' Llama RMSNorm:
normalise in float32, round to the input dtype, then multiply by the weight.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


_rms_norm_op = None


def _build_op():
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_out, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton_op("nexus_lessons::rms_norm", mutates_args=())
    def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        rows = x.reshape(-1, n)
        out = torch.empty_like(rows)
        block = triton.next_power_of_2(n)
        wrap_triton(_rms_norm_kernel)[(rows.shape[0],)](rows, weight, out, n, rows.stride(0), out.stride(0), eps,
                                                        BLOCK=block)
        return out.reshape(x.shape)

    return rms_norm_triton


def build() -> None:
    """Define and register the op now (torch.compile must not trace its first definition)."""
    global _rms_norm_op
    if _rms_norm_op is None:
        _rms_norm_op = _build_op()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton kernel on CUDA tensors (x and weight of one dtype), the reference elsewhere."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"weight has {weight.shape[-1]} entries for a hidden size of {x.shape[-1]}")
    if not x.is_cuda or weight.dtype != x.dtype:
        return rms_norm_ref(x, weight, eps)
    build()
    return _rms_norm_op(x.contiguous(), weight, eps)
