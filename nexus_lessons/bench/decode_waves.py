"""Where paged decode loses its last few percent to SDPA: waves, occupancy, and the read ceiling.

    python -m nexus_lessons.bench.decode_waves --out course/results

A diagnostic for lesson 02's decode kernel (H200, the benchmark's heads: Hq 32, Hkv 8, D 128, bf16,
16-token pages, shuffled tables). It measures, in one run:

* the read ceiling: a streaming-read Triton kernel over 2 GB (GB/s read), beside the copy bandwidth the
  benchmark divides by (read + write): decode only reads, so it can pass 100% of "copy";
* the compiled decode kernel's registers, spills and shared memory, hence programs per SM;
* wave quantisation: ours and SDPA at batch sizes around the benchmark's (B x Hkv programs against
  ``programs per SM x SMs`` slots). If the last partial wave is what costs us, %-of-copy jumps at the
  batches whose program count fills whole waves, and SDPA (which splits to balance) does not;
* which kernels SDPA launches for each benchmark case (torch.profiler names).

``--cases long --name decode_long_h200.json``: where a long single sequence (1 x 32k, 64k, 128k) spends its
time: the split kernel alone, the merge alone, both, against SDPA and against a plain streaming read of
the same bytes with as many programs (what any one-wave kernel of that size reaches); and the split
length fixed on the host (``max_context_len`` given, as ``PagedKVCache`` does) against the old in-kernel
one.

``--cases streamk --name decode_streamk_h200.json``: the stream-K schedule (``kernels/decode_streamk.py``)
and its variants beside the split schedule and SDPA, at the benchmark's shapes, one past a full wave
(68 x 4096, 272 x 1024), 8 x 32k, and two batches of mixed lengths.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..kernels import paged_decode_attention_ref
from ..kernels.paged_attention import DecodeConfig
from .common import copy_bandwidth_gbs, environment, save_json
from .paged_kernels import DTYPE, HKV, HQ, D, decode_bytes, max_err, paged_cache, time_graph

# (batch, context); context 0: mixed lengths
STREAMK_CASES = [(64, 4096), (68, 4096), (256, 1024), (272, 1024), (1, 32768), (8, 32768), (64, 0), (200, 0)]
WAVE_CASES = [(56, 4096), (60, 4096), (64, 4096), (66, 4096), (68, 4096), (72, 4096),
              (240, 1024), (248, 1024), (256, 1024), (264, 1024), (272, 1024), (1, 32768)]  # fmt: skip

SK = dict(schedule="streamk")
SPLIT = DecodeConfig(schedule="split")  # the baseline: the split kernel whatever the grid
STREAMK_VARIANTS = [
    ("auto (the default)", DecodeConfig()),
    ("streamk", DecodeConfig(**SK)),  # block ids prefetched
    ("streamk fused", DecodeConfig(fused_merge=True, **SK)),
    ("streamk no-prefetch", DecodeConfig(prefetch_ids=False, **SK)),
    ("streamk maxnreg=128", DecodeConfig(maxnreg=128, **SK)),
    ("streamk maxnreg=128 fused", DecodeConfig(maxnreg=128, fused_merge=True, **SK)),
    ("streamk no-prefetch maxnreg=128", DecodeConfig(prefetch_ids=False, maxnreg=128, **SK)),
    ("streamk stages=4", DecodeConfig(num_stages=4, **SK)),
    ("streamk block_n=32 stages=4", DecodeConfig(block_n=32, num_stages=4, **SK)),
    ("split maxnreg=128 (prefetch when split)", DecodeConfig(maxnreg=128, schedule="split")),
]


LONG_CASES = [32768, 65536, 131072]


class _Skip:
    """Stands in for a kernel whose launch is to be left out (``kernel[grid](...)`` does nothing)."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def long_case(context: int, copy_gbs: float) -> dict[str, Any]:
    """Batch 1 x ``context``: the split decode taken apart, beside SDPA and a streaming read of its bytes."""
    from ..kernels import paged_attention as pa

    data = paged_cache([context], seed=context)
    q = torch.randn(1, HQ, D, device="cuda", dtype=DTYPE)
    pargs = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])
    nbytes = decode_bytes(1, context)
    want = F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)[:, :, 0]
    row: dict[str, Any] = dict(batch=1, context=context, bytes=nbytes)

    def timed(label: str, fn: Any, check: bool = True) -> None:
        if check:
            err = max_err(fn(), want)
            assert err <= 2e-2, f"{label}: max abs error {err}"
        ms = time_graph(fn)
        row[label] = dict(ms=round(ms, 5), pct_copy=round(100 * nbytes / ms / 1e6 / copy_gbs, 1))
        print(f"  {context} {label:40s} {row[label]}", flush=True)

    timed("sdpa", lambda: F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)[:, :, 0])
    timed("ours, split length in the kernel", lambda: pa.paged_decode_attention_triton(*pargs))
    timed("ours, split length from the host", lambda: pa.paged_decode_attention_triton(*pargs, max_context_len=context))
    timed("ours, host split, merge pdl=end",
          lambda: pa.paged_decode_attention_triton(*pargs, max_context_len=context, config=DecodeConfig(pdl="end")))  # fmt: skip
    timed("ours, host split, fused merge", lambda: pa.paged_decode_attention_triton(
        *pargs, max_context_len=context, config=DecodeConfig(fused_merge=True)))  # fmt: skip
    for splits in (24, 40, 48, 64):
        timed(f"ours, host split, {splits} splits",
              lambda splits=splits: pa.paged_decode_attention_triton(*pargs, max_context_len=context, num_splits=splits))  # fmt: skip
    saved = pa._decode_merge_kernel, pa._decode_split_kernel
    try:
        pa._decode_merge_kernel = _Skip()
        timed("split kernel alone (host split)", lambda: pa.paged_decode_attention_triton(*pargs, max_context_len=context),
              check=False)  # fmt: skip
        pa._decode_merge_kernel, pa._decode_split_kernel = saved[0], _Skip()
        timed("merge kernel alone", lambda: pa.paged_decode_attention_triton(*pargs, max_context_len=context), check=False)
    finally:
        pa._decode_merge_kernel, pa._decode_split_kernel = saved
    kv = torch.cat([data["k"].reshape(-1), data["v"].reshape(-1)])  # the bytes decode reads, contiguous
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per_sm in (2, 4, 8):
        partial = torch.empty(sms * per_sm, device="cuda", dtype=torch.float32)
        timed(f"streaming read, {per_sm} programs/SM",
              lambda partial=partial: _read_kernel[(partial.numel(),)](kv, partial, kv.numel(), BLOCK=4096, num_warps=8),
              check=False)  # fmt: skip
    splits, prefetch = pa.decode_plan(1, HKV, context, sms, pa.default_decode_config(DTYPE, D, q.device))
    row["plan"] = dict(splits=splits, prefetch_ids=prefetch, programs=HKV * splits)
    return row


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr):
    """Each program sums every grid-th BLOCK of X: reads only, one float written per program."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.sum(acc, 0))


def read_bandwidth_gbs(nbytes: int = 2 << 30) -> dict[str, float]:
    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, float] = {}
    for per_sm, block in ((4, 4096), (8, 4096), (16, 2048)):
        grid = sms * per_sm
        partial = torch.empty(grid, device="cuda", dtype=torch.float32)

        def run(grid=grid, partial=partial, block=block):
            _read_kernel[(grid,)](x, partial, x.numel(), BLOCK=block, num_warps=8)

        ms = time_graph(run)
        out[f"{per_sm}/SM block={block}"] = round(nbytes / ms / 1e6, 1)
    ms = time_graph(lambda: x.sum())
    out["torch.sum"] = round(nbytes / ms / 1e6, 1)
    return out


def compiled_kernels(fn: Any) -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every compiled variant of a @triton.jit function."""
    found = []
    for cache in getattr(fn, "device_caches", {}).values():
        for part in cache if isinstance(cache, tuple) else (cache,):
            if isinstance(part, dict):
                for kernel in part.values():
                    if hasattr(kernel, "n_regs"):
                        meta = kernel.metadata
                        found.append(dict(name=getattr(meta, "name", "?"), n_regs=kernel.n_regs,
                                          n_spills=kernel.n_spills, shared=getattr(meta, "shared", None),
                                          num_warps=getattr(meta, "num_warps", None),
                                          num_stages=getattr(meta, "num_stages", None)))  # fmt: skip
    return found


def sdpa_kernel_names(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})


def main(argv: list[str] | None = None) -> int:
    from ..kernels.paged_attention import (
        _decode_split_kernel,
        decode_plan,
        default_decode_config,
        fits_per_sm,
        num_sms,
    )
    from ..kernels.paged_attention import paged_decode_attention_triton as ours

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="course/results")
    ap.add_argument(
        "--once",
        nargs=2,
        type=int,
        metavar=("BATCH", "CONTEXT"),
        help="run ours and SDPA once at this shape and exit (for a profiler such as ncu)",
    )
    ap.add_argument(
        "--cases",
        choices=("waves", "streamk", "long"),
        default="waves",
        help="waves: the batch sweep around one wave; streamk: the stream-K schedule's variants",
    )
    ap.add_argument("--name", default="decode_waves_h200.json", help="the JSON file written under --out")
    args = ap.parse_args(argv)
    if args.once:
        batch, context = args.once
        data = paged_cache([context] * batch, seed=0)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
        ours(q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])
        F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)
        torch.cuda.synchronize()
        return 0
    path = Path(args.out) / args.name
    res: dict[str, Any] = dict(benchmark="decode_waves", environment=environment(), cases=[])
    res["copy_gbs"] = copy_bandwidth_gbs()
    res["read_gbs"] = read_bandwidth_gbs()
    print("copy", res["copy_gbs"], "read", res["read_gbs"], flush=True)
    sms = num_sms(torch.device("cuda"))
    if args.cases == "long":
        for context in LONG_CASES:
            res["cases"].append(long_case(context, res["copy_gbs"]))
            torch.cuda.empty_cache()  # the case's tensors died with its frame
            save_json(res, path)
        return 0
    cases = WAVE_CASES if args.cases == "waves" else STREAMK_CASES
    for batch, context in cases:
        mixed = context == 0  # mixed lengths: uniform in [1, 8192), a fixed draw
        g = torch.Generator().manual_seed(batch)
        lens = torch.randint(1, 8192, (batch,), generator=g).tolist() if mixed else [context] * batch
        data = paged_cache(lens, seed=batch + context)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
        pargs = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])
        cfg = default_decode_config(DTYPE, D, q.device)
        splits, _ = decode_plan(batch, HKV, max(lens), sms, cfg)

        def sdpa(q=q, data=data):
            return F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)[
                :, :, 0
            ]

        want = sdpa() if not mixed else paged_decode_attention_ref(*pargs)
        nbytes = decode_bytes(batch, sum(lens) / batch)

        def pct(ms: float, nbytes: float = nbytes) -> float:
            return round(100 * nbytes / ms / 1e6 / res["copy_gbs"], 1)

        t_ours = time_graph(lambda pargs=pargs: ours(*pargs, config=SPLIT))
        row = dict(batch=batch, context="mixed 1-8191" if mixed else context, tokens=sum(lens),
                   programs=batch * HKV * splits, splits=splits, max_abs_err=max_err(ours(*pargs, config=SPLIT), want),
                   ours_ms=round(t_ours, 5), ours_pct_copy=pct(t_ours))  # fmt: skip
        if not mixed:
            t_sdpa = time_graph(sdpa)
            row.update(
                sdpa_ms=round(t_sdpa, 5), sdpa_pct_copy=pct(t_sdpa), speedup_vs_sdpa=round(t_sdpa / t_ours, 3)
            )
            if (batch, context) in ((64, 4096), (256, 1024), (1, 32768)):
                row["sdpa_kernels"] = sdpa_kernel_names(q, data["k"], data["v"])
        if args.cases == "streamk":
            row["streamk"] = []
            for label, vcfg in STREAMK_VARIANTS:
                try:
                    err = max_err(ours(*pargs, config=vcfg), want)
                    assert err <= 2e-2, f"max abs error {err}"
                    ms = time_graph(lambda pargs=pargs, vcfg=vcfg: ours(*pargs, config=vcfg))
                    entry = dict(variant=label, ms=round(ms, 5), pct_copy=pct(ms), max_abs_err=err,
                                 vs_split=round(t_ours / ms, 3))  # fmt: skip
                    if not mixed:
                        entry["vs_sdpa"] = round(row["sdpa_ms"] / ms, 3)
                except Exception as exc:  # noqa: BLE001 - a variant that fails must not stop the sweep
                    entry = dict(variant=label, error=f"{type(exc).__name__}: {exc}"[:500])
                row["streamk"].append(entry)
                print("  ", entry, flush=True)
        res["cases"].append(row)
        print({k: v for k, v in row.items() if k != "streamk"}, flush=True)
        del data
        torch.cuda.empty_cache()
        save_json(res, path)
    from ..kernels import paged_attention

    res["programs_per_sm"] = [
        dict(kernel=k[0], meta=dict(k[2:]), fits=v) for k, v in paged_attention._FITS.items()
    ]
    res["decode_kernels"] = compiled_kernels(_decode_split_kernel)
    props = torch.cuda.get_device_properties(0)
    res["device"] = dict(sms=sms, smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", None),
                         regs_per_sm=getattr(props, "regs_per_multiprocessor", None))  # fmt: skip
    for k in res["decode_kernels"]:
        k["programs_per_sm"] = fits_per_sm(k["n_regs"], k["shared"] or 0, k["num_warps"] or 4, torch.device("cuda"))
    print(res["decode_kernels"], flush=True)
    save_json(res, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
