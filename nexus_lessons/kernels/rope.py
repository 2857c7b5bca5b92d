"""A decode step's RoPE and K/V page write as one kernel (vLLM's rotary_embedding + reshape_and_cache).

Why: at batch 1 rotating q and k and storing k and v are a few kilobytes of work, but left to the
compiler they are three small kernels per layer (about 1 us each on an H200, plus the gaps between
them), 48 launches per token for a 16-layer model. One program per head does the whole job: a query
head is rotated into the output, a KV head is rotated and stored with its value row into the token's
page slot. The rotation is computed in float32 and rounded once, as torch.compile's fused version does.

Layout (the CUDA-graph decoder's pages): ``k_pages, v_pages [num_slots, Hkv, D]`` token-major, the new
token of row b goes to flat slot ``slots[b]``. q/k/v are the qkv projection's column slices [B, H*D]
(any row stride), cos/sin [B, D] are the rotary tables at each row's position (rotate-half convention).
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] rotated by cos/sin [B, D]: x * cos + rotate_half(x) * sin (the model's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def rope_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Rotated queries [B, Hq, D]; rotated k and plain v written into ``k_pages/v_pages[slots]``."""
    B, Hkv, D = q.shape[0], k_pages.shape[1], k_pages.shape[2]
    q_rot = _rotate(q.reshape(B, -1, D), cos, sin)
    k_rot = _rotate(k.reshape(B, Hkv, D), cos, sin)
    k_pages.index_copy_(0, slots, k_rot)
    v_pages.index_copy_(0, slots, v.reshape(B, Hkv, D))
    return q_rot


_kernels: dict[str, object] = {}


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_and_cache_kernel(
        Q, K, V, Cos, Sin, KPages, VPages, Slots, QOut,
        stride_q, stride_k, stride_v, stride_cos, stride_sin, stride_page, stride_qo,
        NUM_Q_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        """Program (row, head): heads [0, Hq) rotate a query head; heads >= Hq a KV head, and store it."""
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        i = tl.arange(0, BLOCK_HALF)
        m = i < HALF
        c1 = tl.load(Cos + row * stride_cos + i, mask=m).to(tl.float32)
        c2 = tl.load(Cos + row * stride_cos + HALF + i, mask=m).to(tl.float32)
        s1 = tl.load(Sin + row * stride_sin + i, mask=m).to(tl.float32)
        s2 = tl.load(Sin + row * stride_sin + HALF + i, mask=m).to(tl.float32)
        if head < NUM_Q_HEADS:
            src = Q + row * stride_q + head * 2 * HALF
            dst = QOut + row * stride_qo + head * 2 * HALF
        else:
            kv = head - NUM_Q_HEADS
            slot = tl.load(Slots + row)
            src = K + row * stride_k + kv * 2 * HALF
            dst = KPages + slot * stride_page + kv * 2 * HALF
            vsrc = V + row * stride_v + kv * 2 * HALF
            vdst = VPages + slot * stride_page + kv * 2 * HALF
            tl.store(vdst + i, tl.load(vsrc + i, mask=m), mask=m)
            tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i, mask=m), mask=m)
        x1 = tl.load(src + i, mask=m).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        tl.store(dst + i, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=m)
        tl.store(dst + HALF + i, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=m)

    _kernels["rope_and_cache"] = _rope_and_cache_kernel


def build() -> None:
    """Define the kernel now (torch.compile must not trace its first definition)."""
    if not _kernels:
        _build()


def launch(q, k, v, cos, sin, k_pages, v_pages, slots) -> torch.Tensor:
    """The Triton kernel (a CUDA device, or any device under TRITON_INTERPRET=1)."""
    import triton

    build()
    B, Hkv, D = q.shape[0], k_pages.shape[1], k_pages.shape[2]
    Hq = q.shape[1] // D
    q_out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _kernels["rope_and_cache"][(B, Hq + Hkv)](
        q, k, v, cos, sin, k_pages, v_pages, slots, q_out,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), k_pages.stride(0), q_out.stride(0),
        NUM_Q_HEADS=Hq, HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=1,
    )  # fmt: skip
    return q_out


@torch.library.custom_op("nexus_lessons::rope_and_cache", mutates_args=("k_pages", "v_pages"))
def _rope_and_cache_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_pages: torch.Tensor, v_pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Opaque to torch.compile, CUDA-graph safe (no host reads); the reference off the GPU."""
    if q.is_cuda:
        return launch(q, k, v, cos, sin, k_pages, v_pages, slots)
    return rope_and_cache_ref(q, k, v, cos, sin, k_pages, v_pages, slots)


@_rope_and_cache_op.register_fake
def _(q, k, v, cos, sin, k_pages, v_pages, slots):
    D = k_pages.shape[2]
    return q.new_empty(q.shape[0], q.shape[1] // D, D)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """``rope_and_cache_ref``'s effect and result: one Triton launch on CUDA, the reference elsewhere.

    q [B, Hq*D], k/v [B, Hkv*D] (column slices of the qkv output are fine), cos/sin [B, D],
    k_pages/v_pages [slots, Hkv, D] (contiguous), slots [B] int64 (distinct).
    """
    if k_pages.dim() != 3 or v_pages.shape != k_pages.shape or not k_pages.is_contiguous() or not v_pages.is_contiguous():
        raise ValueError(f"k_pages/v_pages must be contiguous [slots, Hkv, D], got {tuple(k_pages.shape)} / {tuple(v_pages.shape)}")
    B, (_, Hkv, D) = q.shape[0], k_pages.shape
    if D % 2:
        raise ValueError(f"rotary head_dim must be even, got {D}")
    if q.dim() != 2 or q.shape[1] % D:
        raise ValueError(f"q must be [B, Hq*{D}], got {tuple(q.shape)}")
    for name, t, width in (("k", k, Hkv * D), ("v", v, Hkv * D), ("cos", cos, D), ("sin", sin, D)):
        if t.shape != (B, width) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [{B}, {width}] with unit column stride, got {tuple(t.shape)}")
    if slots.shape != (B,) or slots.dtype != torch.long:
        raise ValueError(f"slots must be a [{B}] int64 tensor, got {tuple(slots.shape)} {slots.dtype}")
    if len({t.dtype for t in (q, k, v, k_pages, v_pages)}) != 1 or len({t.device for t in (q, k, v, cos, sin, k_pages, v_pages, slots)}) != 1:
        raise ValueError("q, k, v and the pages must share one dtype, and every tensor one device")
    if q.stride(-1) != 1:
        raise ValueError("q needs a unit column stride")
    if q.is_cuda:
        build()
    return _rope_and_cache_op(q, k, v, cos, sin, k_pages, v_pages, slots)
