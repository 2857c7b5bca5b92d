"""What every Triton kernel here shares: the interpreter check, base-2 softmax, dot precision, SM count.

Import order matters once: Triton decides at ``@triton.jit`` time whether a kernel is compiled or
interpreted (``TRITON_INTERPRET=1``), so ``dispatch.triton_kernels`` imports all kernel modules together.
"""

from __future__ import annotations

import functools

import torch
import triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), with log2(e) folded into the scale


@triton.jit
def _probe():
    pass


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when these kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(_probe, InterpretedFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 would otherwise run in tf32 (a 10-bit mantissa)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Whether dot operands must be upcast: under the interpreter ``tl.dot`` on bfloat16 is silently wrong
    (numpy has no bfloat16)."""
    return dtype == torch.bfloat16 and interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
