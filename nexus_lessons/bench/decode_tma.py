"""Does loading each (page, KV head) as one TMA box beat the pointer gather in paged decode? One H200 run.

    python -m nexus_lessons.bench.decode_tma --out DIR          # CUDA only, ~3-4 minutes

Same cases and data as ``paged_kernels`` (bf16, Hq 32, Hkv 8, D 128, 16-token blocks, shuffled block
tables): decode 64 x 4096, 256 x 1024 and 1 x 32768. Per case, in one run on the same data: the current
kernel (``paged_decode_attention_triton``) at its defaults, SDPA (``enable_gqa=True``) on a contiguous copy
of the cache, and the TMA kernel (``paged_decode_attention_tma``) over pages_per_iter {1, 2, 4} x
num_stages {3, 4, 6} x prefetch_ids {off, on} (4 warps); at 1 x 32768 also forced split counts 32 / 64 / 96
where they differ from the heuristic's (stages 4 and 6 only). Every kernel is checked against SDPA
(max abs error < 2e-2) before it is timed: median ms of CUDA-graph replays (``time_graph``; rep 50 ms for
the sweep). Reported: ms, GB/s (K + V read + q read + out written), % of the device-to-device copy
bandwidth measured in this run, speed vs SDPA and vs the current kernel (> 1: faster). A variant that
fails (compile error, shared memory, wrong answer) is recorded and skipped; no variant starts after
``--budget-s`` (each case has a share of it). The JSON (DIR/decode_tma.json) is saved after every variant.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import copy_bandwidth_gbs, environment, save_json
from .paged_kernels import BLOCK, DTYPE, HKV, HQ, D, decode_bytes, paged_cache, time_graph

CASES = [
    (64, 4096, 0.3),
    (256, 1024, 0.5),
    (1, 32768, 1.0),
]  # batch, context, share of the budget used by its end
PAGES_PER_ITER = (1, 2, 4)
STAGES = (3, 4, 6)
FORCED_SPLITS = (32, 64, 96)  # 1 x 32768 only
TOL = 2e-2


def stats(
    ms: float, nbytes: int, copy_gbs: float, sdpa_ms: float | None, current_ms: float | None
) -> dict[str, Any]:
    gbs = nbytes / ms / 1e6
    return dict(ms=round(ms, 5), gbs=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1),
                vs_sdpa=round(sdpa_ms / ms, 3) if sdpa_ms else None,
                vs_current=round(current_ms / ms, 3) if current_ms else None)  # fmt: skip


def tma_variants(batch: int, context: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, kwargs of paged_decode_attention_tma): the grid at the heuristic's split count, then forced
    split counts at batch 1."""
    from ..kernels.paged_attention import choose_num_splits, num_sms

    out = []
    for ppi in PAGES_PER_ITER:
        for stages in STAGES:
            for prefetch in (False, True):
                out.append((f"ppi={ppi} stages={stages} prefetch={int(prefetch)} splits=auto",
                            dict(pages_per_iter=ppi, num_warps=4, num_stages=stages, prefetch_ids=prefetch)))  # fmt: skip
    if batch == 1:
        for splits in FORCED_SPLITS:
            for ppi in PAGES_PER_ITER:
                if splits == choose_num_splits(
                    batch, HKV, context, num_sms(torch.device("cuda")), BLOCK * ppi
                ):
                    continue  # the same launch as splits=auto
                for stages in (4, 6):
                    for prefetch in (False, True):
                        out.append((f"ppi={ppi} stages={stages} prefetch={int(prefetch)} splits={splits}",
                                    dict(pages_per_iter=ppi, num_warps=4, num_stages=stages, prefetch_ids=prefetch,
                                         num_splits=splits)))  # fmt: skip
    return out


class Run:
    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.budget_s, self.t0 = path, budget_s, time.perf_counter()
        self.results: dict[str, Any] = {
            "benchmark": "decode_tma",
            "environment": environment(),
            "shape": dict(Hq=HQ, Hkv=HKV, D=D, block_size=BLOCK, dtype=str(DTYPE), block_tables="shuffled"),
            "timing": "median ms per call replayed in a CUDA graph (triton do_bench_cudagraph); rep 50 ms for TMA variants",
            "bytes": "K + V read for every context token + q read + out written (block tables ignored)",
            "ratios": "vs_sdpa = sdpa_ms / ms, vs_current = current_ms / ms: > 1 is faster",
            "cases": [],
            "errors": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        save_json(self.results, self.path)

    def error(self, where: str, exc: BaseException) -> dict[str, str]:
        entry = {
            "where": where,
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "trace": traceback.format_exc()[-3000:],
        }
        self.results["errors"].append(entry)
        print(f"  ! {where}: {entry['error'][:300]}", flush=True)
        torch.cuda.synchronize()
        return {"error": entry["error"]}


def run_case(run: Run, batch: int, context: int, deadline_s: float, copy_gbs: float) -> None:
    from ..kernels.paged_attention import paged_decode_attention_triton
    from ..kernels.paged_decode_tma import paged_decode_attention_tma

    name = f"decode {batch}x{context}"
    print(f"\n{name}", flush=True)
    nbytes = decode_bytes(batch, context)
    row: dict[str, Any] = dict(case=name, batch=batch, context=context, bytes=nbytes, variants=[])
    run.results["cases"].append(row)
    data = paged_cache([context] * batch, seed=batch * 7 + context)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    args = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)[:, :, 0]

    def current() -> torch.Tensor:
        return paged_decode_attention_triton(*args)

    want = sdpa().float()

    def err(fn: Callable[[], torch.Tensor]) -> float:
        e = (fn().float() - want).abs().max().item()
        if not e < TOL:  # also NaN
            raise AssertionError(f"max abs error {e:.4g} vs SDPA exceeds {TOL}: not timing a wrong answer")
        return e

    sdpa_ms = time_graph(sdpa)
    row["sdpa"] = stats(sdpa_ms, nbytes, copy_gbs, sdpa_ms, None)
    try:
        row["current"] = dict(max_abs_err=err(current))
        current_ms = time_graph(current)
        row["current"].update(stats(current_ms, nbytes, copy_gbs, sdpa_ms, current_ms))
    except Exception as exc:  # noqa: BLE001 - the TMA sweep still means something against SDPA
        row["current"], current_ms = run.error(f"{name} current", exc), None
    print(f"  sdpa    {row['sdpa']}\n  current {row['current']}", flush=True)
    run.save()

    for label, kwargs in tma_variants(batch, context):
        if run.elapsed() > deadline_s:
            row["variants"].append(dict(variant=label, skipped="time budget"))
            continue

        def call(kwargs=kwargs) -> torch.Tensor:
            return paged_decode_attention_tma(*args, **kwargs)

        try:
            entry: dict[str, Any] = dict(variant=label, max_abs_err=err(call))
            entry.update(stats(time_graph(call, rep_ms=50), nbytes, copy_gbs, sdpa_ms, current_ms))
        except Exception as exc:  # noqa: BLE001 - a variant that fails must not stop the run
            entry = dict(variant=label, **run.error(f"{name} {label}", exc))
        row["variants"].append(entry)
        print(f"  {label:42s} {entry.get('ms', '-')} ms  {entry.get('pct_copy', '-')}%  "
              f"x{entry.get('vs_sdpa', '-')} sdpa  x{entry.get('vs_current', '-')} current", flush=True)  # fmt: skip
        run.save()
    timed = [v for v in row["variants"] if "ms" in v]
    if timed:
        row["best_tma"] = min(timed, key=lambda v: v["ms"])


def table(results: dict[str, Any]) -> str:
    """Per case: SDPA, the current kernel, the best TMA variant and the best of each pages_per_iter/prefetch."""
    lines = [
        f"copy {results.get('copy_gbs')} GB/s",
        f"{'case':18s} {'kernel':50s} {'us':>8s} {'%copy':>6s} {'xSDPA':>6s} {'xcur':>6s}",
    ]
    for row in results["cases"]:
        picks = [("sdpa", row.get("sdpa", {})), ("current (defaults)", row.get("current", {}))]
        timed = [v for v in row["variants"] if "ms" in v]
        for ppi in PAGES_PER_ITER:
            for prefetch in (0, 1):
                group = [
                    v
                    for v in timed
                    if v["variant"].startswith(f"ppi={ppi} ") and f"prefetch={prefetch}" in v["variant"]
                ]
                if group:
                    best = min(group, key=lambda v: v["ms"])
                    picks.append((f"tma best {best['variant']}", best))
        for label, r in picks:
            if "ms" in r:
                ratios = " ".join(
                    f"{r[k]:6.3f}" if r.get(k) is not None else f"{'-':>6s}"
                    for k in ("vs_sdpa", "vs_current")
                )
                lines.append(
                    f"{row['case']:18s} {label:50s} {1000 * r['ms']:8.1f} {r['pct_copy']:6.1f} {ratios}"
                )
        failed = sum(1 for v in row["variants"] if "error" in v)
        skipped = sum(1 for v in row["variants"] if "skipped" in v)
        if failed or skipped:
            lines.append(f"{row['case']:18s} ({failed} variants failed, {skipped} skipped for time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="course/results", help="folder for decode_tma.json")
    parser.add_argument(
        "--budget-s", type=float, default=200, help="start no TMA variant after this many seconds"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_tma needs a CUDA GPU (Hopper for TMA); correctness on CPU: tests/test_decode_tma.py")
        return 2
    run = Run(Path(args.out) / "decode_tma.json", args.budget_s)
    copy_gbs = copy_bandwidth_gbs()
    run.results["copy_gbs"] = round(copy_gbs, 1)
    print(f"device-to-device copy: {copy_gbs:.1f} GB/s (read + write)", flush=True)
    failed = False
    for batch, context, share in CASES:
        try:
            run_case(run, batch, context, share * args.budget_s, copy_gbs)
        except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
            run.error(f"decode {batch}x{context}", exc)
            failed = True
        run.save()
        torch.cuda.empty_cache()  # the case's pool is garbage now
    print("\n" + table(run.results))
    print(f"\nwrote {run.path} ({run.elapsed():.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
