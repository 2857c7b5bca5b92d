"""What every benchmark records and measures the same way: environment, JSON output, the bandwidth bound,
CUDA-event timing (eager and graphed)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Device, versions, date and command: enough to tell where a number came from."""
    import transformers

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({env['cpu']}, {env['cpu_threads']} threads)"
    return env


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects the name of every Triton kernel compiled (or loaded from the disk cache)
    inside the block, or None where this Triton has no compile hook. A timed run should find it empty: a
    compile there is a warm-up that missed a shape."""
    try:
        from triton import knobs

        previous = knobs.runtime.jit_post_compile_hook
    except (ImportError, AttributeError):  # no Triton, or one without the hook: nothing to count with
        yield None
        return
    names: list[str] = []

    def hook(*args, **kwargs):
        name = getattr(kwargs.get("fn"), "name", "?")
        names.append(name.rsplit(".", 1)[-1])  # the qualified name's last part
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield names
    finally:
        knobs.runtime.jit_post_compile_hook = previous


def top_kernels(fn: Callable[[], Any], top: int = 12) -> list[dict[str, Any]]:
    """The GPU kernels `fn` runs, by total device time (torch.profiler, one call after a warm-up): where
    the time of a step goes, for a result that misses its floor."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1e3}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def command_line() -> str:
    """The command that is running, as a learner would type it (`python -m pkg.mod args`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head.removesuffix(".__main__"), *sys.argv[1:]])


def save_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def copy_bandwidth_gbs(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth, bytes read + bytes written over the median time."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return 2 * src.nbytes / times[len(times) // 2] / 1e9


# Peak HBM bandwidth from the datasheets (GB/s), recorded beside the measured read bandwidth.
DATASHEET_GBPS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0}


def datasheet_gbps(device_name: str) -> float | None:
    """The datasheet's memory bandwidth for a device name (H100 SXM 3.35 TB/s, H200 4.8 TB/s), if known."""
    for key, gbps in DATASHEET_GBPS.items():  # most specific names first
        if key in device_name:
            return gbps
    return None


def read_bandwidth_gbs(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Read-only bandwidth: a ``sum`` over a buffer far bigger than L2, bytes read over the median time.

    The bound for a kernel that only reads (decode attention, a GEMV): a copy reads and writes, so a
    good read-only kernel beats it.
    """
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    for _ in range(3):
        buf.sum()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        buf.sum()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del buf
    times.sort()
    return (nbytes // 2 * 2) / times[len(times) // 2] / 1e9


def median(values: Sequence[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def time_eager_ms(calls: Sequence[Callable[[], Any]], reps: int = 10) -> float:
    """Median ms per call, the calls issued back to back as a user's loop issues them (host work included).

    Each rep records one event pair around all ``calls`` (e.g. one per copy of the data, so each call
    finds its data cold in L2) and divides; reps follow each other with no sync, so a call whose host
    work outlasts the GPU's shows as the host's time, and one whose GPU work is longer as the GPU's.
    """
    for call in calls:  # warm-up: compile, plan, allocate
        call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        for call in calls:
            call()
        end.record()
    torch.cuda.synchronize()
    return median([s.elapsed_time(e) for s, e in events]) / len(calls)


def time_graph_ms(calls: Sequence[Callable[[], Any]], reps: int = 10) -> float:
    """Median ms per call with all ``calls`` captured in one CUDA graph and replayed (no host work)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the capture stream: compile, plan, allocate
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return median([s.elapsed_time(e) for s, e in events]) / len(calls)
