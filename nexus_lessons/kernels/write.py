"""Writing a step's new keys and values into their cache slots (vLLM's ``reshape_and_cache``).

The cache is ``[num_blocks, block_size, Hkv, D]``; a slot is ``block * block_size + offset``. One
program per new token copies its ``[Hkv, D]`` key and value rows; slot -1 (padding) stores nothing.
The PyTorch twin is ``reference.write_kv_cache_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    K, V, KCache, VCache, SlotMapping,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    num_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + token).to(tl.int64)
    safe = tl.maximum(slot, 0)  # keep the address arithmetic in range; the mask does the skipping
    block = safe // BLOCK_SIZE
    offset = safe % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A vector, not a scalar bool: the interpreter cannot broadcast a scalar mask.
    keep = (tl.zeros([BLOCK_H], tl.int64) + slot) >= 0
    mask = (offs_h[:, None] < num_heads) & keep[:, None] & (offs_d[None, :] < head_dim)
    k = tl.load(K + token * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(V + token * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    kc = KCache + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd
    vc = VCache + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(kc, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VCache.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton twin of ``write_kv_cache_ref``: in place, one program per token (arguments already checked)."""
    n, num_heads, head_dim = k.shape
    if n == 0:
        return
    _write_kv_cache_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        num_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )  # fmt: skip
