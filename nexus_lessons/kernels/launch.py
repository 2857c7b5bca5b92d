"""Launch a compiled Triton kernel without Triton's per-call dispatch, once the caller has seen its variant.

Why: ``kernel[grid](*args, **meta)`` binds and specializes every argument and builds a string cache key
on every call. For a kernel of ~40 arguments that is most of a decode step's host time, and at small
shapes the step is host-bound (the GPU work is shorter). The caller knows what Triton specializes on
(constexprs, dtypes, strides, pointer alignment) and passes it as ``key``. The first call of a key runs
the normal way and keeps the ``CompiledKernel`` it returns; later calls call its C launcher directly,
the call ``JITFunction.run`` itself makes after its cache hit: all parameters in signature order,
constexprs included, and the stream current now (CUDA-graph capture switches it).

With a launch hook installed (a profiler such as proton) every call takes the normal path, so the hook
sees every launch. A Triton whose launch returns no compiled kernel is never cached. CUDA only.
"""

from __future__ import annotations

from typing import Any

from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # a Triton without knobs: always the normal path
    knobs = None

_LAUNCHERS: dict[tuple, tuple | None] = {}  # (device, key) -> (run, function, packed metadata, tail) or None


def _hooked() -> bool:
    if knobs is None:
        return True
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(getattr(h, "calls", h) for h in hooks)  # a HookChain, or a plain hook (or None)


def launch(kernel: Any, grid: tuple, key: tuple, args: tuple, meta: dict[str, Any]) -> None:
    """``kernel[grid](*args, **meta)``. ``key`` must differ between any two calls Triton would compile
    differently (``meta`` is taken as a function of ``key``); the current device is added to it."""
    device = driver.active.get_current_device()
    entry = _LAUNCHERS.get((device, key), False)
    if entry and not _hooked():
        run, function, packed, tail = entry
        grid0, grid1, grid2 = (*grid, 1, 1)[:3]
        stream = driver.active.get_current_stream(device)
        # launch metadata and enter/exit hooks: None, as none is installed
        run(grid0, grid1, grid2, stream, function, packed, None, None, None, *args, *tail)
        return
    compiled = kernel[grid](*args, **meta)
    if entry is False:
        if len(_LAUNCHERS) > 4096:
            _LAUNCHERS.clear()
        _LAUNCHERS[(device, key)] = _launcher(kernel, compiled, len(args), meta)


def _launcher(kernel: Any, compiled: Any, nargs: int, meta: dict[str, Any]) -> tuple | None:
    """What a hit needs: the C launcher, the loaded function, its metadata, and the values of the parameters
    after ``args`` (constexprs from ``meta``, else their defaults); None if ``compiled`` has no launcher."""
    if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
        return None
    run = compiled.run  # loads the module first if needed, which sets ``function``
    tail = tuple(meta[p.name] if p.name in meta else p.default for p in kernel.params[nargs:])
    return run, compiled.function, compiled.packed_metadata, tail
