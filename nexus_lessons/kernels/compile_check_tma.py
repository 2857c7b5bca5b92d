"""Compile the experimental TMA decode kernel for a GPU on a machine without one; registers and spills.

    python -m nexus_lessons.kernels.compile_check_tma            # sm_90, the benchmark's sweep configs
    python -m nexus_lessons.kernels.compile_check_tma --quick    # the default config only

``compile_check`` does this for paged_attention.py's kernels; this adds tensor-descriptor arguments
(typed ``tensordesc<dtype[box]>``, as Triton's JIT mangles them). Must run WITHOUT ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import paged_decode_tma as tma
from .compile_check import _TRITON_TYPES, Launch, _Recorder, _resource_usage


def record(call: Callable[[], Any]) -> list[Launch]:
    """Run the TMA launcher with its kernels swapped for recorders (and TMA taken as available)."""
    names = ["_tma_decode_split_kernel", "_decode_merge_kernel", "tma_available"]
    saved = {n: getattr(tma, n) for n in names}
    sink: list[Launch] = []
    try:
        tma._tma_decode_split_kernel = _Recorder(saved["_tma_decode_split_kernel"], sink)
        tma._decode_merge_kernel = _Recorder(saved["_decode_merge_kernel"], sink)
        tma.tma_available = lambda device: True
        call()
    finally:
        for n, v in saved.items():
            setattr(tma, n, v)
    return sink


def compile_launch(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile one recorded launch for sm_<arch>: shared bytes, registers, stack (spills) per thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn = launch.kernel
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("the kernels were built by the interpreter: unset TRITON_INTERPRET and run again")
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    given = dict(zip(fn.arg_names, launch.args))
    given.update({k: v for k, v in launch.kwargs.items() if k not in options})
    constexpr_names = {fn.arg_names[p.num] for p in fn.params if p.is_constexpr}
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        value = given[name]
        if name in constexpr_names:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, TensorDescriptor):
            signature[name] = mangle_type(value)
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={value!r}")
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)  # fmt: skip
    ttgir = compiled.asm.get("ttgir", "")
    info: dict[str, Any] = {"kernel": fn.__name__, "shared": compiled.metadata.shared, **options,
                            "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
                            "buffers": _tma_buffers(ttgir)}  # fmt: skip
    info.update(_resource_usage(compiled.asm.get("cubin")))
    return info


# (pages_per_iter, num_stages, prefetch_ids), as the benchmark sweeps them
def _tma_buffers(ttgir: str) -> str:
    """How deep each pipelined K/V page buffer is: the leading dims of the [n, page, D] shared allocations."""
    import re

    depths = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", ttgir)
    return "/".join(sorted(set(depths))) or "-"


SWEEP = [(p, s, f) for f in (False, True) for p in (1, 2, 4) for s in (3, 4, 6)]


def cases(quick: bool = False) -> list[tuple[str, Callable[[], Any]]]:
    """The benchmark's shapes (bf16, Hq 32, Hkv 8, D 128, 16-token blocks): direct and split launches."""
    meta = torch.device("meta")
    cache = torch.empty(4096, 16, 8, 128, device=meta, dtype=torch.bfloat16)
    q = torch.empty(64, 32, 128, device=meta, dtype=torch.bfloat16)
    tables = torch.empty(64, 256, device=meta, dtype=torch.int32)
    lens = torch.empty(64, device=meta, dtype=torch.int32)

    def call(ppi: int, stages: int, prefetch: bool, splits: int) -> Callable[[], Any]:
        return lambda: tma.paged_decode_attention_tma(q, cache, cache, tables, lens, num_splits=splits, pages_per_iter=ppi,
                                                      num_stages=stages, prefetch_ids=prefetch)  # fmt: skip

    configs = [(1, 4, False), (1, 4, True)] if quick else SWEEP
    out = []
    for ppi, stages, prefetch in configs:
        name = f"ppi={ppi} stages={stages} prefetch={int(prefetch)}"
        out.append((f"{name} 1 split", call(ppi, stages, prefetch, 1)))
        out.append((f"{name} 64 splits", call(ppi, stages, prefetch, 64)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="only pages_per_iter=1, num_stages=4")
    args = parser.parse_args(argv)
    failed = 0
    for label, call in cases(args.quick):
        for launch in record(call):
            try:
                info = compile_launch(launch, args.arch)
            except Exception as exc:  # noqa: BLE001 - report every failure, not just the first
                failed += 1
                print(f"FAIL {label:38s} {launch.kernel.__name__}: {type(exc).__name__}: {str(exc)[:500]}")
                continue
            spill = " SPILLS" if info.get("stack", 0) else ""
            print(f"ok   {label:38s} {info['kernel']:24s} warps={info.get('num_warps')} stages={info.get('num_stages')} "
                  f"shared={info['shared']} regs={info.get('registers', '?')} stack={info.get('stack', '?')} "
                  f"tma_copies={info['tma_copies']} buffers={info['buffers']}{spill}", flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
