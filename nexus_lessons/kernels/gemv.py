"""Batch-1 projections as one matrix-vector kernel each, with their neighbours folded in.

Why: a batch-1 decode step reads every weight once and does two flops per weight, so each projection
is a memory-bound matrix-vector product (GEMV) and the step's time is bytes / bandwidth plus the time
lost in launches, tails and kernels that read too little at once. This kernel folds into the GEMV what
sits around it in a Llama layer, so one layer is four GEMV launches:

    qkv     = W_qkv  @ rmsnorm(x)                       (NORM: every program computes 1/rms from x)
    x       = x + W_o @ attn                            (RESIDUAL)
    gate_up = W_gu   @ rmsnorm(x)                       (NORM)
    x       = x + W_down @ (silu(gate) * up)            (SILU_MUL and RESIDUAL)

The input vector is a few KB and stays in L2, so recomputing the activation in every program costs far
less than a launch. The norm is factored out of the sum, W @ (g * x * r) = r * (W @ (g * x)) with
r = 1/rms(x), so the sum of squares accumulates in the same pass as the product: no program waits for
a first pass over x before it starts reading its weights. The price is one rounding fewer than the
unfused ops (x * r is not rounded to bf16 before the product), so the fused result is a little closer
to the exact one; the activation and the residual round where PyTorch rounds them.

``fused_linear`` runs the kernel for CUDA inputs of at most ``MAX_ROWS`` rows; otherwise, e.g. for a
prompt, the unfused ops of ``fused_linear_ref`` with ``kernels.norm``'s RMSNorm and SiLU-and-mul.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .norm import rms_norm, rms_norm_ref, silu_and_mul, silu_and_mul_ref

MAX_ROWS = 4  # above this a matrix-matrix product (cuBLAS) reads each weight once for all rows: use it


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused ops the kernel stands for: [silu_and_mul] -> [rms_norm] -> linear -> [+ residual]."""
    return _chain(x, weight, bias, norm_weight, eps, silu_mul, residual, rms_norm_ref, silu_and_mul_ref)


def _chain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
           eps: float, silu_mul: bool, residual: torch.Tensor | None, norm: Callable, act: Callable) -> torch.Tensor:
    """[act] -> [norm] -> linear -> [+ residual], with the given norm and activation."""
    if silu_mul:
        x = act(x)
    if norm_weight is not None:
        x = norm(x, norm_weight, eps)
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def _configs():
    import triton

    # (rows per program, columns per iteration, warps, stages). Each program issues 8-16 KB of loads per
    # iteration; small row blocks give the 2048-row projections enough programs for 132 SMs. The best of
    # the H200 sweep (bench/gemv.py) for the 1B layer's shapes are all here.
    shapes = [(2, 1024, 4, 1), (2, 2048, 4, 1), (4, 1024, 4, 1), (4, 2048, 4, 1), (4, 2048, 8, 1),
              (8, 1024, 4, 1), (8, 2048, 8, 1), (16, 1024, 8, 1)]  # fmt: skip
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


_kernels: dict[str, object] = {}


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _fused_linear_kernel(
        X, W, Bias, G, R, Y, N, K,
        stride_xm, stride_wn, stride_rm, stride_ym, eps,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr, RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Program (row block, input row): y[rows] = W[rows, :] @ f(x) over K in BLOCK_K chunks.

        The M programs of one row block are adjacent in launch order, so they run side by side and the
        block's weights come from memory once and from L2 for the other input rows."""
        dtype = Y.dtype.element_ty
        M = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
        m = (tl.program_id(0) % M).to(tl.int64)
        rows = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        x_row = X + m * stride_xm
        sq = tl.zeros([BLOCK_K], tl.float32)  # sum of squares of x, for the norm
        w_rows = W + rows.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # reduced once at the end, not per chunk
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_mask = cols < K
            if SILU_MUL:  # x holds [gate | up]; F.silu rounds, then the product rounds
                gate = tl.load(x_row + cols, mask=k_mask, other=0.0).to(tl.float32)
                up = tl.load(x_row + K + cols, mask=k_mask, other=0.0).to(tl.float32)
                silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
                xv = (silu * up).to(dtype).to(tl.float32)
            else:
                xv = tl.load(x_row + cols, mask=k_mask, other=0.0).to(tl.float32)
            if NORM:  # r * (g * x), r applied after the sum
                sq += xv * xv
                xv *= tl.load(G + cols, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            acc += w.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, 1)
        if NORM:
            y *= 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
        if HAS_BIAS:
            y += tl.load(Bias + rows, mask=row_mask, other=0.0).to(tl.float32)
        if RESIDUAL:  # the projection's output rounds before the add, as in x + linear(...)
            y = y.to(dtype).to(tl.float32) + tl.load(R + m * stride_rm + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + rows, y.to(dtype), mask=row_mask)

    _kernels["plain"] = _fused_linear_kernel
    # On a GPU the tile is picked per (N, K, variant) by timing the candidates once, at the first call.
    _kernels["tuned"] = triton.autotune(
        configs=_configs(), key=["N", "K", "NORM", "SILU_MUL", "RESIDUAL"], warmup=3, rep=15
    )(_fused_linear_kernel)


def build() -> None:
    """Define the kernels now (torch.compile must not trace their first definition)."""
    if not _kernels:
        _build()


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    silu_mul: bool,
    residual: torch.Tensor | None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Run the kernel on x [M, K or 2K] (rows contiguous); ``config`` (BLOCK_N, BLOCK_K, warps, stages)
    skips the tuning (the interpreter, and the benchmark's sweep)."""
    import triton

    build()
    M = x.shape[0]
    N, K = weight.shape
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, weight, bias if bias is not None else y, norm_weight if norm_weight is not None else y,
            residual if residual is not None else y, y, N, K,
            x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), eps)  # fmt: skip
    flags = dict(HAS_BIAS=bias is not None, NORM=norm_weight is not None, SILU_MUL=silu_mul,
                 RESIDUAL=residual is not None)  # fmt: skip
    if config is None and x.is_cuda:
        _kernels["tuned"][lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)](*args, **flags)
    else:
        block_n, block_k, warps, stages = config or (8, 256, 4, 1)
        _kernels["plain"][(triton.cdiv(N, block_n) * M,)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k,
                                                        num_warps=warps, num_stages=stages)  # fmt: skip
    return y


@torch.library.custom_op("nexus_lessons::fused_linear", mutates_args=())
def _fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, eps: float, silu_mul: bool,
                     residual: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Opaque to torch.compile (it would otherwise re-derive the GEMV itself) and CUDA-graph safe."""
    return launch(x, weight, bias, norm_weight, eps, silu_mul, residual)


@_fused_linear_op.register_fake
def _(x, weight, bias, norm_weight, eps, silu_mul, residual):
    return x.new_empty(x.shape[0], weight.shape[0])


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_linear_ref``'s result; one Triton GEMV on CUDA for at most MAX_ROWS rows of one dtype."""
    k_in = x.shape[-1] // 2 if silu_mul else x.shape[-1]
    if silu_mul and x.shape[-1] % 2:
        raise ValueError(f"silu_mul needs [gate | up] inputs of even width, got {x.shape[-1]}")
    if weight.dim() != 2 or weight.shape[1] != k_in:
        raise ValueError(f"weight {tuple(weight.shape)} does not take inputs of width {k_in}")
    if norm_weight is not None and norm_weight.shape != (k_in,):
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)}, expected ({k_in},)")
    lead = x.shape[:-1]
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    tensors = [t for t in (weight, bias, norm_weight, residual) if t is not None]
    if not (x.is_cuda and 0 < rows <= MAX_ROWS and all(t.dtype == x.dtype and t.is_cuda for t in tensors)):
        # a matrix product (cuBLAS) between the norm and activation kernels (the references off CUDA)
        return _chain(x, weight, bias, norm_weight, eps, silu_mul, residual, rms_norm, silu_and_mul)
    build()
    flat_res = None if residual is None else residual.reshape(rows, weight.shape[0]).contiguous()
    y = _fused_linear_op(x.reshape(rows, x.shape[-1]).contiguous(), weight.contiguous(), bias, norm_weight,
                         float(eps), bool(silu_mul), flat_res)  # fmt: skip
    return y.reshape(*lead, weight.shape[0])
