"""Compile the Triton kernels for a GPU on a machine without one; report shared memory, registers, spills.

    python -m nexus_lessons.kernels.compile_check            # sm_90 (H100/H200), the benchmark's shapes
    python -m nexus_lessons.kernels.compile_check --arch 80  # A100

The interpreter checks what a kernel computes, not whether it compiles: a type clash between loop
iterations, a tile too big for shared memory or a config that spills registers only shows up in the real
compiler. Triton's compiler and ptxas run fine without a GPU, so this module calls each launcher with
``meta`` tensors, records the launch it would make (arguments, constexprs, warps, stages), specialises
the arguments the way Triton's JIT does (pointers 16-byte aligned, ints divisible by 16 marked, ints equal
to 1 folded, except those the kernel marks ``do_not_specialize``) and compiles for the target. It must
run WITHOUT ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import decode, decode_streamk, extend, write

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}  # fmt: skip


@dataclass
class Launch:
    kernel: Any
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running it."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, kwargs))


def record(call: Callable[[], Any]) -> list[Launch]:
    """Run a launcher with the kernels swapped for recorders; return the launches it would make."""
    names = {write: ["_write_kv_cache_kernel"], decode: ["_decode_split_kernel"], extend: ["_extend_kernel"],
             decode_streamk: ["_decode_streamk_kernel", "_streamk_merge_kernel"]}  # fmt: skip
    saved = {(mod, n): getattr(mod, n) for mod, ns in names.items() for n in ns}
    sink: list[Launch] = []
    try:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, _Recorder(kernel, sink))
        call()
    finally:
        for (mod, n), kernel in saved.items():
            setattr(mod, n, kernel)
    return sink


def compile_launch(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile one recorded launch for sm_<arch>; shared bytes, registers and stack (spills) per thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
        if name in constexpr_names or value is None:  # triton specialises a None argument as a constant
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            specialize = not fn.params[i].do_not_specialize
            if value == 1 and specialize:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0 and specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={value!r}")
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)  # fmt: skip
    info: dict[str, Any] = {"kernel": fn.__name__, "shared": compiled.metadata.shared, **options}
    info.update(_resource_usage(compiled.asm.get("cubin")))
    return info


def _resource_usage(cubin: bytes | None) -> dict[str, Any]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if cubin is None or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    usage: dict[str, Any] = {}
    for field in out.split():
        key, _, value = field.partition(":")
        if key in ("REG", "STACK") and value.isdigit():
            usage["registers" if key == "REG" else "stack"] = int(value)
    return usage


def cases(quick: bool = False) -> list[tuple[str, Callable[[], Any]]]:
    """Launchers at the benchmark's head shapes (Hq 32, Hkv 8, D 128, 16-token blocks), GPU configs."""
    meta = torch.device("meta")
    cuda = torch.device("cuda")  # only to pick the GPU configs; no tensor lives there

    def cache(dtype: torch.dtype, d: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(4096, 16, 8, d, device=meta, dtype=dtype),) * 2

    def table(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(b, 256, device=meta, dtype=torch.int32), torch.empty(b, device=meta, dtype=torch.int32)

    def decode_case(dtype: torch.dtype, splits: int | None, d: int = 128, group: int = 4, **how: Any) -> Callable[[], Any]:
        q = torch.empty(64, 8 * group, d, device=meta, dtype=dtype)
        cfg = replace(decode.default_decode_config(dtype, d, cuda), streamk=False, **how)  # fmt: skip
        return lambda: decode_streamk.paged_decode_attention_triton(q, *cache(dtype, d), *table(64), num_splits=splits,
                                                                    config=cfg)  # fmt: skip

    def streamk(dtype: torch.dtype) -> Callable[[], Any]:
        q = torch.empty(64, 32, 128, device=meta, dtype=dtype)
        cfg = decode.default_decode_config(dtype, 128, cuda)
        return lambda: decode_streamk.paged_decode_attention_streamk(q, *cache(dtype), *table(64), num_programs=528,
                                                                     config=cfg)  # fmt: skip

    def extend_case(dtype: torch.dtype, tree: bool, d: int = 128) -> Callable[[], Any]:
        q = torch.empty(8 * 2048, 32, d, device=meta, dtype=dtype)
        qsl = torch.empty(9, device=meta, dtype=torch.int32)
        mask = torch.empty(8 * 2048, 64, device=meta, dtype=torch.bool) if tree else None
        cfg = extend.default_extend_config(dtype, d, cuda, tree)
        return lambda: extend.paged_prefill_attention_triton(q, *cache(dtype, d), *table(8), qsl, None, mask,
                                                             max_query_len=2048, config=cfg)  # fmt: skip

    def write_case(dtype: torch.dtype) -> Callable[[], Any]:
        k = torch.empty(64, 8, 128, device=meta, dtype=dtype)
        slots = torch.empty(64, device=meta, dtype=torch.int64)
        return lambda: write.write_kv_cache_triton(k, k, *cache(dtype), slots)

    bf16 = torch.bfloat16
    out = [("write bf16", write_case(bf16)), ("decode bf16 1 split", decode_case(bf16, 1)),
           ("decode bf16 8 splits", decode_case(bf16, 8)),
           ("decode bf16 32 splits", decode_case(bf16, 32)),  # the 1 x 32k plan: the merge's widest load
           ("decode bf16 1 split 1 warp", decode_case(bf16, 1, block_n=32, num_warps=1)),  # many programs
           ("decode bf16 stream-K", streamk(bf16)),
           ("extend bf16 causal", extend_case(bf16, False)),
           ("extend bf16 tree mask", extend_case(bf16, True))]  # fmt: skip
    if not quick:
        out += [("decode fp16 64 splits", decode_case(torch.float16, 64)), ("decode fp32 4 splits", decode_case(torch.float32, 4)),
                ("decode bf16 D=256 G=8", decode_case(bf16, 2, 256, 8)), ("decode bf16 D=64 G=1", decode_case(bf16, 2, 64, 1)),
                ("extend fp32 causal", extend_case(torch.float32, False)),
                ("extend bf16 D=256", extend_case(bf16, False, 256))]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="only the bf16 head shapes")
    args = parser.parse_args(argv)
    failed = 0
    for label, call in cases(args.quick):
        for launch in record(call):
            try:
                info = compile_launch(launch, args.arch)
            except Exception as exc:  # noqa: BLE001 - report every failure, not just the first
                failed += 1
                print(f"FAIL {label:24s} {launch.kernel.__name__}: {type(exc).__name__}: {str(exc)[:500]}")
                continue
            spill = " SPILLS" if info.get("stack", 0) else ""
            print(f"ok   {label:24s} {info['kernel']:22s} warps={info.get('num_warps')} stages={info.get('num_stages')} "
                  f"shared={info['shared']} regs={info.get('registers', '?')} stack={info.get('stack', '?')}{spill}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
