"""Lesson 03's quantized paged decode (and extend) on a GPU, against lesson 02's bf16 kernel, in one run.

    python -m nexus_lessons.bench quant_decode --out course/results     # H100 / H200, ~3 min
    python -m nexus_lessons.bench quant_decode --smoke --out /tmp/q     # any machine (interpreter on CPU)

Lesson 02's shapes: Hq 32, Hkv 8, D 128, bf16 compute, 16-token blocks with SHUFFLED block tables, decode at
64 x 4096, 256 x 1024 and 1 x 32768. Formats: the bf16 cache (lesson 02's ``paged_decode_attention``),
int8 and fp8 (16-token blocks) and int4 at 16- and 64-token blocks (64 is int4's default: its keys'
quantization group, where the per-block scales cost 0.5 bit per key). Every context is a multiple of
both block sizes, so int4's tails are empty here; the tests cover them.

Decode is memory-bound, so each format is reported against what it must read: the bytes it actually
reads (data + scales + q + out, ``quant_reference.bytes_per_token``) over its time, as % of the read
bandwidth of a large ``torch.sum`` measured in the same run (the datasheet figures beside it), and its
time as a fraction of the bf16 kernel's at the same shape. Times are medians: ``ms`` replays the call in a
CUDA graph (``triton.testing.do_bench_cudagraph``), ``ms_eager`` is ``do_bench`` with the L2 flushed
before every call, the public function's launch cost included. Before any timing each kernel is checked
against its PyTorch reference on the same quantized data (``max_err``: absolute below 1, relative above).
``variants`` times a few tile / warp / stage / split choices per format on the same data, so one run says
what to tune. Extend: 4 sequences of 1024
cached + 512 new tokens (the prefix read from the quantized pool), against lesson 02's extend on bf16.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import environment, save_json

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
CASES = [(64, 4096), (256, 1024), (1, 32768)]
FORMATS = [("bf16", 16), ("int8", 16), ("fp8", 16), ("int4", 16), ("int4", 64)]
EXTEND = (4, 1024, 512)  # sequences, cached tokens, new tokens
# --smoke: small heads and contexts, any device; checks that the script runs end to end
SMOKE_HEADS = (4, 2, 32)
SMOKE_CASES = [(2, 64)]
SMOKE_EXTEND = (1, 64, 16)
DATASHEET_GBS = {"H100": 3350, "H200": 4800}
TARGETS = {"time_vs_bf16": {"int8": 0.6, "fp8": 0.6, "int4": 0.4}, "pct_read_min": 85}


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_wall(fn: Callable[[], Any], reps: int = 1) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _median(times)


def time_graph(fn: Callable[[], Any], device: torch.device, rep_ms: int = 100) -> float:
    """Median ms per call replayed from a CUDA graph (wall clock off the GPU)."""
    if device.type != "cuda":
        return time_wall(fn)
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def time_eager(fn: Callable[[], Any], device: torch.device, rep_ms: int = 100) -> float:
    """Median ms per call, L2 flushed before each (triton's do_bench)."""
    if device.type != "cuda":
        return time_wall(fn)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def read_bandwidth_gbs(device: torch.device, nbytes: int = 4 << 30) -> float | None:
    """A large read-only reduction: the bound for a kernel that only reads (graphed, median)."""
    if device.type != "cuda":
        return None
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    ms = time_graph(lambda: x.sum(), device)
    return nbytes / ms / 1e6


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


def shuffled_tables(lens: list[int], page: int, device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, int]:
    need = [math.ceil(n / page) for n in lens]
    num_blocks = sum(need) + 8
    ids = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[at : at + n]
        at += n
    return tables.to(device), num_blocks


def make_pool(fmt: str, page: int, batch: int, context: int, heads: tuple[int, int, int], device: torch.device,
              seed: int) -> dict[str, Any]:  # fmt: skip
    """Random K/V (keys with outlier channels) for `batch` sequences of `context` tokens in a shuffled pool,
    written through the format's write kernel: bf16 as is, the others quantized."""
    from ..kernels import quant, write_kv_cache
    from ..kernels.quant_reference import empty_quantized_kv

    _, hkv, d = heads
    impl = "auto" if device.type == "cuda" else "reference"  # building the data is not what is measured
    g = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_tables([context] * batch, page, device, g)
    k = torch.randn(num_blocks * page, hkv, d, device=device, dtype=DTYPE)
    k[..., : d // 16] = k[..., : d // 16] * 8 + 4  # a few outlier channels, as real keys have
    v = torch.randn(num_blocks * page, hkv, d, device=device, dtype=DTYPE)
    slots = torch.arange(num_blocks * page, device=device)
    if fmt == "bf16":
        k_cache = torch.empty(num_blocks, page, hkv, d, device=device, dtype=DTYPE)
        v_cache = torch.empty_like(k_cache)
        write_kv_cache(k, v, k_cache, v_cache, slots, impl=impl, validate=False)
        pool: Any = (k_cache, v_cache)
    else:
        pool = empty_quantized_kv(fmt, num_blocks, page, hkv, d, dtype=DTYPE, device=device, num_tail=1)
        if fmt == "int4":  # every block full: one completion per block, nothing to the tail
            blocks = torch.arange(num_blocks, device=device, dtype=torch.int32)
            comp = torch.stack([blocks, torch.full_like(blocks, -1), torch.zeros_like(blocks), blocks * page], 1)
            quant.int4_write_kv(k, v, pool, torch.full_like(slots, -1), comp, impl=impl, validate=False)
        else:
            quant.quant_write_kv(k, v, pool, slots, impl=impl, validate=False)
    del k, v
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    tails = torch.full((batch,), -1, dtype=torch.int32, device=device)
    return dict(pool=pool, tables=tables, lens=lens, tails=tails)


def bytes_read(fmt: str, page: int, batch: int, context: int, heads: tuple[int, int, int]) -> int:
    """What a decode step must read (K/V data and scales of every context token, q) and write (out)."""
    from ..kernels.quant_reference import bytes_per_token

    hq, hkv, d = heads
    per_token = bytes_per_token("auto" if fmt == "bf16" else fmt, hkv, d, page)
    return int(batch * context * per_token + 2 * batch * hq * d * 2)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, |b|): absolute below 1, relative above. The outputs are bf16, whose rounding
    step grows with the value (1/32 between 4 and 8, where the peaked attention of outlier keys puts a few
    outputs), so an absolute bound would fail a kernel that differs from its reference by one rounding."""
    a, b = a.float(), b.float()
    return ((a - b).abs() / b.abs().clamp(min=1)).max().item()


def check(what: str, err: float, tol: float) -> None:
    if not err <= tol:  # NaN fails too
        raise AssertionError(f"{what}: max error {err:.4g} (scaled by max(1, |ref|)) > {tol}: not timing a wrong answer")


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, path: Path, device: torch.device, heads: tuple[int, int, int], budget_s: float, variants: bool):
        self.path, self.device, self.heads, self.budget_s, self.variants = path, device, heads, budget_s, variants
        self.t0 = time.perf_counter()
        hq, hkv, d = heads
        self.results: dict[str, Any] = {
            "benchmark": "quant_decode",
            "environment": environment(),
            "shape": dict(Hq=hq, Hkv=hkv, D=d, compute_dtype=str(DTYPE), block_tables="shuffled"),
            "timing": "ms: median per call replayed in a CUDA graph (triton do_bench_cudagraph); ms_eager: median of "
            "triton do_bench (L2 flushed before each call), the public function with validate=False",
            "bytes": "what each format reads per step: K/V data + scales of every context token + q, + out written",
            "targets": TARGETS,
            "decode": [],
            "extend": [],
            "errors": [],
        }  # fmt: skip

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        save_json(self.results, self.path)

    def error(self, where: str, exc: BaseException) -> dict[str, str]:
        entry = {"where": where, "error": f"{type(exc).__name__}: {exc}"[:1500], "trace": traceback.format_exc()[-2500:]}
        self.results["errors"].append(entry)
        print(f"  ! {where}: {entry['error'][:300]}", flush=True)
        return entry


def decode_variants(fmt: str, page: int, batch: int, hkv: int) -> list[tuple[str, Any, int | None]]:
    from ..kernels.quant_attention import QuantDecodeConfig as C

    if fmt == "int4":
        tiles = [C(page, 4, 4), C(page, 2, 3), C(page, 8, 3)] + ([C(32, 4, 3)] if page >= 32 else [C(32, 4, 3), C(64, 4, 3)])
    else:
        tiles = [C(32, 4, 3), C(128, 4, 2), C(64, 8, 3), C(64, 2, 3), C(64, 4, 4), C(32, 1, 3)]
    out = [(f"block_n={c.block_n} warps={c.num_warps} stages={c.num_stages}", c, None) for c in tiles]
    if batch * hkv < 132:
        out += [(f"splits={s}", None, s) for s in (16, 64)]
    return out


def run_decode(run: Run, batch: int, context: int, read_gbs: float | None) -> None:
    from ..kernels import paged_decode_attention, paged_decode_attention_ref, quant
    from ..kernels.quant_attention import (
        choose_num_splits,
        default_quant_decode_config,
        num_sms,
        quant_decode_attention_triton,
    )
    from ..kernels.quant_reference import quant_decode_attention_ref

    dev, heads = run.device, run.heads
    hq, hkv, d = heads
    name = f"{batch}x{context}"
    print(f"\ndecode {name}", flush=True)
    case: dict[str, Any] = dict(case=name, batch=batch, context=context, formats=[])
    run.results["decode"].append(case)
    q = torch.randn(batch, hq, d, device=dev, dtype=DTYPE)
    few = slice(0, min(batch, 4))
    bf16_ms = None
    for fmt, page in FORMATS:
        label = f"{fmt} (block {page})"
        try:
            data = make_pool(fmt, page, batch, context, heads, dev, seed=batch + context + page)
            tables, lens, tails, pool = data["tables"], data["lens"], data["tails"], data["pool"]
            if fmt == "bf16":
                def call(pool=pool, tables=tables, lens=lens):
                    return paged_decode_attention(q, *pool, tables, lens, max_context_len=context, validate=False)

                ref = paged_decode_attention_ref(q[few], *pool, tables[few], lens[few])
                splits = None
            else:
                def call(pool=pool, tables=tables, lens=lens, tails=tails):
                    return quant.quant_decode_attention(q, pool, tables, lens, tail_slots=tails, max_context_len=context,
                                                        validate=False)  # fmt: skip

                ref = quant_decode_attention_ref(q[few], pool, tables[few], lens[few], None, tails[few])
                cfg = default_quant_decode_config(fmt, page, dev)
                splits = choose_num_splits(batch, hkv, context, num_sms(dev), cfg.block_n, 2)
            err = max_err(call()[few], ref)
            check(f"decode {name} {label} vs its reference", err, 2e-2)
            nbytes = bytes_read(fmt, page, batch, context, heads)
            ms = time_graph(call, dev)
            row = dict(format=fmt, block_size=page, bytes=nbytes, ms=round(ms, 5), ms_eager=round(time_eager(call, dev), 5),
                       gbs=round(nbytes / ms / 1e6, 1), max_err_vs_reference=err, num_splits=splits)  # fmt: skip
            if read_gbs:
                row["pct_read"] = round(100 * row["gbs"] / read_gbs, 1)
            if fmt == "bf16":
                bf16_ms = ms
            elif bf16_ms:
                row["time_vs_bf16"] = round(ms / bf16_ms, 3)
            case["formats"].append(row)
            print(f"  {label:16s} {row['ms']:.4f} ms (eager {row['ms_eager']:.4f})  {row['gbs']} GB/s  "
                  f"{row.get('pct_read', '-')}% of read  x{row.get('time_vs_bf16', 1.0)} of bf16", flush=True)  # fmt: skip
            if run.variants and fmt != "bf16":
                row["variants"] = []
                for vlabel, vcfg, vsplits in decode_variants(fmt, page, batch, hkv):
                    if run.left_s() < 45:
                        row["variants"].append(dict(variant=vlabel, skipped="time budget"))
                        continue
                    try:
                        def var(vcfg=vcfg, vsplits=vsplits, pool=pool, tables=tables, lens=lens, tails=tails):
                            return quant_decode_attention_triton(q, pool, tables, lens, None, tails, num_splits=vsplits,
                                                                 max_context_len=context, config=vcfg)  # fmt: skip

                        check(f"decode {name} {label} {vlabel}", max_err(var()[few], ref), 2e-2)
                        vms = time_graph(var, dev, rep_ms=50)
                        entry = dict(variant=vlabel, ms=round(vms, 5), gbs=round(nbytes / vms / 1e6, 1))
                        if read_gbs:
                            entry["pct_read"] = round(100 * entry["gbs"] / read_gbs, 1)
                    except Exception as exc:  # noqa: BLE001 - a variant must not stop the run
                        entry = dict(variant=vlabel, **run.error(f"decode {name} {label} {vlabel}", exc))
                    row["variants"].append(entry)
                best = min((v for v in row["variants"] if "ms" in v), key=lambda v: v["ms"], default=None)
                if best:
                    print(f"    best variant: {best['variant']} {best['ms']} ms", flush=True)
            del data, pool
        except Exception as exc:  # noqa: BLE001 - record and go on to the next format
            case["formats"].append(dict(format=fmt, block_size=page, **run.error(f"decode {name} {label}", exc)))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        run.save()


def run_extend(run: Run, batch: int, cached: int, new: int) -> None:
    from ..kernels import paged_prefill_attention, quant
    from ..kernels.quant_reference import quant_extend_attention_ref

    dev, heads = run.device, run.heads
    hq, hkv, d = heads
    context = cached + new
    name = f"{batch}x({cached} cached + {new} new)"
    print(f"\nextend {name}", flush=True)
    case: dict[str, Any] = dict(case=name, formats=[])
    run.results["extend"].append(case)
    q = torch.randn(batch * new, hq, d, device=dev, dtype=DTYPE)
    k_new = torch.randn(batch * new, hkv, d, device=dev, dtype=DTYPE)
    v_new = torch.randn(batch * new, hkv, d, device=dev, dtype=DTYPE)
    qsl = torch.arange(0, batch * new + 1, new, device=dev, dtype=torch.int32)
    flops = 4.0 * batch * hq * d * (new * cached + new * (new + 1) / 2)
    rows = slice(0, new)
    for fmt, page in FORMATS:
        label = f"{fmt} (block {page})"
        try:
            data = make_pool(fmt, page, batch, context, heads, dev, seed=7 * batch + page)
            pool, tables, lens, tails = data["pool"], data["tables"], data["lens"], data["tails"]
            if fmt == "bf16":
                def call(pool=pool, tables=tables, lens=lens):
                    return paged_prefill_attention(q, *pool, tables, lens, qsl, k_new=k_new, v_new=v_new,
                                                   max_query_len=new, validate=False)  # fmt: skip

                err = None
            else:
                def call(pool=pool, tables=tables, lens=lens, tails=tails):
                    return quant.quant_extend_attention(q, pool, tables, lens, qsl, k_new, v_new, tail_slots=tails,
                                                        max_query_len=new, validate=False)  # fmt: skip

                ref = quant_extend_attention_ref(q[rows], pool, tables[:1], lens[:1], qsl[:2], k_new[rows], v_new[rows],
                                                 None, tails[:1])  # fmt: skip
                err = max_err(call()[rows], ref)
                check(f"extend {name} {label} vs its reference", err, 3e-2)
            ms = time_graph(call, dev)
            row = dict(format=fmt, block_size=page, ms=round(ms, 5), ms_eager=round(time_eager(call, dev), 5),
                       tflops=round(flops / ms / 1e9, 1), max_err_vs_reference=err)  # fmt: skip
            case["formats"].append(row)
            print(f"  {label:16s} {row['ms']:.4f} ms  {row['tflops']} TFLOP/s", flush=True)
            del data, pool
        except Exception as exc:  # noqa: BLE001
            case["formats"].append(dict(format=fmt, block_size=page, **run.error(f"extend {name} {label}", exc)))
        run.save()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nexus_lessons.bench quant_decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="course/results", help="folder for quant_decode.json (or a .json path)")
    ap.add_argument("--smoke", action="store_true", help="small shapes on any device (the interpreter on CPU)")
    ap.add_argument("--no-variants", action="store_true", help="skip the tile / split sweep")
    ap.add_argument("--budget-s", type=float, default=240, help="variants are skipped past this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("quant_decode needs a CUDA GPU (or --smoke for a small run on this machine)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / "quant_decode.json"
    heads = SMOKE_HEADS if args.smoke else (HQ, HKV, D)
    run = Run(path, device, heads, args.budget_s, variants=not args.no_variants and not args.smoke)
    read_gbs = read_bandwidth_gbs(device)
    run.results["read_gbs"] = None if read_gbs is None else round(read_gbs, 1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    run.results["datasheet_gbs"] = next((v for k, v in DATASHEET_GBS.items() if k in name), None)
    print(f"read bandwidth (torch.sum): {run.results['read_gbs']} GB/s on {run.results['environment']['device']}", flush=True)
    for batch, context in SMOKE_CASES if args.smoke else CASES:
        run_decode(run, batch, context, read_gbs)
    run_extend(run, *(SMOKE_EXTEND if args.smoke else EXTEND))
    run.save()
    print(f"\nwrote {path} ({run.results['elapsed_s']} s, {len(run.results['errors'])} error(s))")
    if run.results["errors"]:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------------
# compiling for the GPU on a machine without one (tests/test_quant_kv.py)
# ---------------------------------------------------------------------------------------------------


def _compile_calls(fmt: str, page: int, qa, qw) -> dict[str, Callable[[], Any]]:
    """Each launcher of one format at the benchmark's shapes and default GPU configs, on meta tensors."""
    from ..kernels.quant_reference import empty_quantized_kv

    meta, cuda = torch.device("meta"), torch.device("cuda")
    kv = empty_quantized_kv(fmt, 4096, page, HKV, D, dtype=DTYPE, device=meta, num_tail=64)
    q = torch.empty(64, HQ, D, device=meta, dtype=DTYPE)
    tables = torch.empty(64, 256, device=meta, dtype=torch.int32)
    ints = torch.empty(64, device=meta, dtype=torch.int32)
    qx = torch.empty(4 * 512, HQ, D, device=meta, dtype=DTYPE)
    kx = torch.empty(4 * 512, HKV, D, device=meta, dtype=DTYPE)
    qsl = torch.empty(5, device=meta, dtype=torch.int32)
    dcfg = qa.default_quant_decode_config(fmt, page, cuda)
    ecfg = qa.default_quant_extend_config(fmt, page, cuda)
    rows = torch.empty(64, HKV, D, device=meta, dtype=DTYPE)
    slots = torch.empty(64, device=meta, dtype=torch.int64)
    comp = torch.empty(4, 4, device=meta, dtype=torch.int32)
    return {
        "decode": lambda: qa.quant_decode_attention_triton(q, kv, tables, ints, None, ints, num_splits=1, config=dcfg),
        "decode split": lambda: qa.quant_decode_attention_triton(q, kv, tables, ints, None, ints, num_splits=32, config=dcfg),
        "extend": lambda: qa.quant_extend_attention_triton(qx, kv, tables[:4], ints[:4], qsl, kx, kx, None, ints[:4],
                                                           max_query_len=512, config=ecfg),
        "write": (lambda: qw.int4_write_kv_triton(rows, rows, kv, slots, comp)) if fmt == "int4"
        else (lambda: qw.quant_write_kv_triton(rows, rows, kv, slots)),
    }  # fmt: skip


def compile_report(arch: int = 90) -> int:
    """Compile every quantized kernel at this benchmark's shapes and default configs for sm_<arch> with
    lesson 02's ``compile_check``; print registers, shared memory and spills; 1 if any failed. Must run
    without TRITON_INTERPRET."""
    from ..kernels import compile_check as cc
    from ..kernels import write as pa
    from ..kernels import quant_attention as qa
    from ..kernels import quant_write as qw

    types = {**cc._TRITON_TYPES, torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}
    saved_types, cc._TRITON_TYPES = cc._TRITON_TYPES, types
    kernels = {qa: ["_quant_decode_kernel", "_quant_extend_kernel"], qw: ["_quant_write_kernel", "_int4_complete_kernel"],
               pa: ["_write_kv_cache_kernel"]}  # fmt: skip
    saved_sms = qa.num_sms
    qa.num_sms = lambda device: 132
    failed = 0
    try:
        for fmt, page in FORMATS[1:]:
            calls = _compile_calls(fmt, page, qa, qw)
            for what, call in calls.items():
                saved = {(m, n): getattr(m, n) for m, ns in kernels.items() for n in ns}
                sink: list = []
                try:
                    for (m, n), k in saved.items():
                        setattr(m, n, cc._Recorder(k, sink))
                    call()
                finally:
                    for (m, n), k in saved.items():
                        setattr(m, n, k)
                for launch in sink:
                    label = f"{fmt} block {page} {what}"
                    try:
                        info = cc.compile_launch(launch, arch)
                    except Exception as exc:  # noqa: BLE001 - report every failure
                        failed += 1
                        print(f"FAIL {label:28s} {launch.kernel.__name__}: {type(exc).__name__}: {str(exc)[:400]}")
                        continue
                    spill = " SPILLS" if info.get("stack", 0) else ""
                    print(f"ok   {label:28s} {info['kernel']:22s} warps={info.get('num_warps')} "
                          f"stages={info.get('num_stages')} shared={info['shared']} regs={info.get('registers', '?')}{spill}")  # fmt: skip
    finally:
        cc._TRITON_TYPES = saved_types
        qa.num_sms = saved_sms
    return 1 if failed else 0


if __name__ == "__main__":
    main()
