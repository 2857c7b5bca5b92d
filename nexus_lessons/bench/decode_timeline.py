"""When each decode program starts, streams and ends: a per-program timeline, and decode config sweeps.

    python -m nexus_lessons.bench.decode_timeline --out course/results

A diagnostic for lesson 02's split decode kernel (H200, Hq 32, Hkv 8, D 128, bf16, 16-token pages,
shuffled tables). With ``paged_attention.TRACE_BUFFER`` set, every program of the split kernel stores
``%globaltimer`` (ns) when it starts, when its loop over the context is done and when it ends (after the
fused merge, for the last split of each KV head), and the SM it ran on. From one launch in a steady
stream of launches it reports, in microseconds from the first program's start: how long the programs
take to start, how long each loop runs, how far the ends spread (the tail, where the GPU runs with fewer
and fewer programs), and what the merge adds after the last loop. Then ``--sweeps`` time split counts,
tiles and warps at 1 x 32k and at the large batches against SDPA in the same run, with each newly
compiled variant's registers and shared memory. ``--tables`` times the default kernel over pools shuffled
in runs of 1 to all blocks (what a fragmented pool costs), with SDPA pinned to each of its backends.
``--layouts`` times it over four layouts of the same values, one of them SDPA's own contiguous tensors read
through a block table: is the gap to SDPA the kernel or the memory it reads?
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import paged_attention as pa
from ..kernels.paged_attention import DecodeConfig
from .common import copy_bandwidth_gbs, environment, save_json
from .decode_waves import compiled_kernels
from .paged_kernels import (
    BLOCK,
    DTYPE,
    HKV,
    HQ,
    D,
    bandwidth_row,
    decode_bytes,
    max_err,
    paged_cache,
    sdpa_backends,
    time_graph,
)

TRACE_CASES: list[tuple[str, int, int, dict[str, Any]]] = [
    ("1 x 32k, default plan", 1, 32768, {}),
    ("1 x 32k, two-kernel merge (split kernel traced)", 1, 32768, dict(config=DecodeConfig(fused_merge=False))),
    ("1 x 32k, 48 splits", 1, 32768, dict(num_splits=48)),
    ("1 x 32k, 64 splits", 1, 32768, dict(num_splits=64)),
    ("1 x 32k, 33 splits", 1, 32768, dict(num_splits=33)),
    ("1 x 32k, 49 splits", 1, 32768, dict(num_splits=49)),
    ("1 x 2048, default plan (4 splits of 8 tiles)", 1, 2048, {}),
    ("64 x 4096, default plan", 64, 4096, {}),
    ("256 x 1024, default plan", 256, 1024, {}),
    ("64 x 4096, 4 splits", 64, 4096, dict(num_splits=4, config=DecodeConfig(prefetch_ids=False, schedule="split"))),
    ("256 x 1024, 2 splits", 256, 1024, dict(num_splits=2, config=DecodeConfig(32, 1, 3, prefetch_ids=False,
                                                                                schedule="split"))),
]

# Session 6's first run swept tiles, warps, stages and split counts here (decode_timeline_h200_run1.json,
# commit 523b22d): nothing beat the default. The third (decode_timeline_h200_32k.json, commit 280ec50) had
# split counts that fill every slot once ranges are balanced page by page, and partials stored in bf16
# (removed again: slower). The large-batch sweep split each sequence (decode_timeline_h200_batch.json, commit
# 280ec50): slower. Session 7's first sweep (decode_timeline_h200_s7.json, commit 45b1749) had the products
# transposed (K q^T and V^T p^T, so the keys are the MMA's M and Hopper's wgmma reads K/V from shared memory):
# within a point of the default everywhere, so removed again. Its second (decode_timeline_h200_s7b.json), the
# list below, keeps more K/V in flight per program with short tiles and deep pipelines (the id prefetch gives
# the gathered tiles num_stages - 1 buffers): 32-token tiles at 4 stages fit 4 programs per SM with 3 tiles of
# 16 KB in flight each. None beat the default either. Session 8 asked L2 for the K/V rows 1-6 tiles ahead
# (DecodeConfig.l2_prefetch, commits 91b781d and 9b0a0b2): as sm_90 bulk prefetches per 256-byte row
# (decode_l2_bulk_h200.json) 0.53-0.88x the plain kernel, as prefetch.global.L2 per 128-byte line
# (decode_l2_h200.json) 0.58-0.99x, worse the further ahead. Removed again. Its second sweep cut the last
# 1/16 to 1/4 of each context into 2-64 small "tail" splits launched after the big ones, so that they would
# fill slots as programs finished (DecodeConfig.tail_splits, commit bfa4f05; decode_tail_h200.json): 0.82-1.00x
# the default. At 64 x 4096 a 2-tile tail split runs ~10 us (the queue of a saturated HBM: ~4 us per
# tile), and at 1 x 32k the tails start at once in the third slot of each SM. Removed again. Its third
# sweep gave each program 2, 4 or 8 KV heads of one sequence (DecodeConfig.heads_per_program, batched dots,
# commit 0a2054f; decode_heads_h200.json): they share the block ids, read 512 B-2 KB per token contiguously and
# advance in lockstep. 0.46-0.91x the default at 64 x 4096 (256 programs or fewer), 0.53-0.99x at 256 x 1024.
# Removed again. Its fourth ran guided self-scheduling (kernels/decode_guided.py, commit aeeaf80;
# decode_guided_h200.json): one wave of persistent programs claims pieces of every unit from a counter, all
# first pieces (1/2, 3/4 or 7/8 of a context) before any second one, so the last pieces claimed are the
# smallest; per-piece partials merged in piece order. 0.79-0.96x the default at 64 x 4096, 0.74-0.94x at
# 256 x 1024, 0.70-0.85x at 1 x 32k (3 programs per SM, and each piece pays its start). Removed again.


def _deep(block_n: int, warps: int, stages: int, **more: Any) -> DecodeConfig:
    return DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages, prefetch_ids=True, **more)


SWEEP_32K: list[tuple[str, dict[str, Any]]] = [("default", {})]
for _splits, _bn, _w, _st in ((32, 32, 4, 5), (32, 32, 4, 7), (48, 32, 4, 4), (64, 32, 4, 4), (32, 32, 2, 5),
                              (64, 16, 2, 6), (64, 16, 4, 6), (48, 16, 4, 8), (32, 64, 4, 4)):
    SWEEP_32K.append((f"{_splits} splits block_n={_bn} warps={_w} stages={_st} prefetch", dict(
        num_splits=_splits, config=_deep(_bn, _w, _st))))  # fmt: skip

SWEEP_BATCH: list[tuple[str, dict[str, Any]]] = [("default", {})]
for _bn, _w, _st in ((32, 4, 3), (32, 4, 4), (32, 2, 4), (32, 1, 4), (16, 4, 6), (16, 2, 6), (16, 1, 6)):
    SWEEP_BATCH.append((f"block_n={_bn} warps={_w} stages={_st} prefetch", dict(
        num_splits=1, config=_deep(_bn, _w, _st, schedule="split"))))  # fmt: skip
SWEEP_BATCH.append(("block_n=32 warps=4 stages=4 prefetch evict_first", dict(
    num_splits=1, config=_deep(32, 4, 4, schedule="split", evict_first=True))))

TABLE_RUNS = (1, 2, 4, 16, 64, 256, 2048, 16384)  # blocks per run; the whole table: identity order
SWEEPS = {"1x32768": (1, 32768, SWEEP_32K), "64x4096": (64, 4096, SWEEP_BATCH), "256x1024": (256, 1024, SWEEP_BATCH)}


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.double(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return {k: round(v, 2) for k, v in zip(("min", "p10", "p50", "p90", "max"), q.tolist())}


def _case(batch: int, context: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any, torch.Tensor, int]:
    """(paged and contiguous K/V, q, SDPA on the contiguous cache, its output [B, Hq, D], bytes one step reads)."""
    data = paged_cache([context] * batch, seed=batch + context)
    q = torch.randn(batch, HQ, D, device=data["k_cache"].device, dtype=DTYPE)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)

    return data, q, sdpa, sdpa()[:, :, 0], decode_bytes(batch, context)


def _pct(nbytes: int, ms: float, copy_gbs: float) -> float | None:
    return bandwidth_row(ms, nbytes, copy_gbs)["pct_copy"]


def trace_case(label: str, batch: int, context: int, how: dict[str, Any], copy_gbs: float) -> dict[str, Any]:
    data, q, _, want, nbytes = _case(batch, context)
    pargs = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])

    def call() -> torch.Tensor:
        return pa.paged_decode_attention_triton(*pargs, max_context_len=context, **how)

    ms_plain = time_graph(call)
    buf = torch.zeros(batch * HKV * pa.MAX_SPLITS, 4, device="cuda", dtype=torch.int64)
    pa.TRACE_BUFFER = buf
    try:
        err = max_err(call(), want)
        assert err <= 2e-2, f"{label}: max abs error {err}"
        ms_traced = time_graph(call)
        buf.zero_()
        for _ in range(20):  # a steady stream of launches; the last one's trace stays in the buffer
            call()
        torch.cuda.synchronize()
    finally:
        pa.TRACE_BUFFER = None
    rows = buf[buf[:, 0] > 0].cpu()
    t0 = rows[:, 0].min()
    start, loop, end = [(rows[:, i] - t0).double() / 1e3 for i in range(3)]
    sm = rows[:, 3]
    per_sm = torch.bincount(sm, minlength=int(sm.max()) + 1)
    ticks = torch.unique(rows[:, :3].flatten())
    row = dict(
        label=label, batch=batch, context=context, programs=len(rows), max_abs_err=err,
        ms=round(ms_plain, 5), ms_traced=round(ms_traced, 5),
        pct_copy=_pct(nbytes, ms_plain, copy_gbs),
        timer_step_ns=int((ticks[1:] - ticks[:-1]).min()) if len(ticks) > 1 else None,
        span_us=round(float(end.max()), 2),
        start_us=_quantiles(start), loop_us=_quantiles(loop - start), loop_end_us=_quantiles(loop),
        end_us=_quantiles(end), merge_after_last_loop_us=round(float(end.max() - loop.max()), 2),
        programs_per_sm={str(k): int(v) for k, v in zip(*torch.unique(per_sm, return_counts=True))},
        raw_ns=dict(start=(rows[:, 0] - t0).tolist(), loop=(rows[:, 1] - t0).tolist(),
                    end=(rows[:, 2] - t0).tolist(), sm=sm.tolist()),
    )  # fmt: skip
    print({k: v for k, v in row.items() if k != "raw_ns"}, flush=True)
    return row


def sweep(copy_gbs: float, batch: int, context: int, variants: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    data, q, sdpa, want, nbytes = _case(batch, context)
    pargs = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])
    t_sdpa = time_graph(sdpa)

    def pct(ms: float) -> float | None:
        return _pct(nbytes, ms, copy_gbs)

    out: dict[str, Any] = dict(batch=batch, context=context, sdpa_ms=round(t_sdpa, 5), sdpa_pct_copy=pct(t_sdpa), variants=[])
    for label, how in variants:
        seen = {k["name"] + str(k["n_regs"]) + str(k["shared"]) for k in compiled_kernels(pa._decode_split_kernel)}
        try:
            err = max_err(pa.paged_decode_attention_triton(*pargs, max_context_len=context, **how), want)
            assert err <= 2e-2, f"max abs error {err}"
            ms = time_graph(lambda how=how: pa.paged_decode_attention_triton(*pargs, max_context_len=context, **how))
            entry = dict(variant=label, ms=round(ms, 5), pct_copy=pct(ms), vs_sdpa=round(t_sdpa / ms, 3), max_abs_err=err)
            new = [k for k in compiled_kernels(pa._decode_split_kernel)
                   if k["name"] + str(k["n_regs"]) + str(k["shared"]) not in seen]  # fmt: skip
            if new:
                k = new[0]
                entry.update(n_regs=k["n_regs"], n_spills=k["n_spills"], shared=k["shared"],
                             programs_per_sm=pa.fits_per_sm(k["n_regs"], k["shared"] or 0, k["num_warps"] or 4,
                                                            q.device))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a variant that fails must not stop the sweep
            entry = dict(variant=label, error=f"{type(exc).__name__}: {exc}"[:400])
        out["variants"].append(entry)
        print("  ", entry, flush=True)
    return out


def pool_in_runs(data: dict[str, torch.Tensor], run: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same K/V values in a pool shuffled in runs: the tables' blocks, in table order, are cut into runs
    of ``run`` consecutive blocks, and the runs are placed at random. ``run`` 1 is a full shuffle; one run
    as long as the pool is identity order. 64 blocks of [16, 8, 128] bf16 are 2 MiB, the GPU's large page."""
    tables = data["block_tables"].long()
    n = tables.numel()
    g = torch.Generator(device="cuda").manual_seed(seed)
    perm = torch.randperm(n // run, device="cuda", generator=g)
    i = torch.arange(n, device="cuda")
    phys = perm[i // run] * run + i % run
    k, v = torch.empty_like(data["k_cache"][:n]), torch.empty_like(data["v_cache"][:n])
    k[phys], v[phys] = data["k_cache"][tables.flatten()], data["v_cache"][tables.flatten()]
    return k, v, phys.to(torch.int32).view(tables.shape)


def sweep_tables(copy_gbs: float, batch: int, context: int, runs: tuple[int, ...]) -> dict[str, Any]:
    """The default kernel over pools shuffled at coarser and coarser grain: where does the shuffle cost?"""
    data, q, sdpa, want, nbytes = _case(batch, context)
    t_sdpa = time_graph(sdpa)
    out: dict[str, Any] = dict(batch=batch, context=context, sdpa_ms=round(t_sdpa, 5),
                               sdpa_pct_copy=_pct(nbytes, t_sdpa, copy_gbs), runs=[])  # fmt: skip
    out["sdpa_by_backend"] = sdpa_backends(
        sdpa, lambda o: max_err(o[:, :, 0], want), lambda t: dict(ms=round(t, 5), pct_copy=_pct(nbytes, t, copy_gbs))
    )
    for run in runs:
        if data["block_tables"].numel() % run:
            continue
        k, v, tables = pool_in_runs(data, run, seed=run)
        pargs = (q, k, v, tables, data["context_lens"])
        err = max_err(pa.paged_decode_attention_triton(*pargs, max_context_len=context), want)
        assert err <= 2e-2, f"run {run}: max abs error {err}"
        ms = time_graph(lambda pargs=pargs: pa.paged_decode_attention_triton(*pargs, max_context_len=context))
        entry = dict(run_blocks=run, ms=round(ms, 5), pct_copy=_pct(nbytes, ms, copy_gbs),
                     vs_sdpa=round(t_sdpa / ms, 3), max_abs_err=err)  # fmt: skip
        out["runs"].append(entry)
        print("  ", entry, flush=True)
        del k, v, tables, pargs
    return out


def sdpa_memory_as_pages(k: torch.Tensor, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's own contiguous [B, Hkv, S, D] tensor seen as a paged pool, and the block tables that read it.

    Block (b, j) is tokens [16 j, 16 j + 16) of sequence b, so a program streams its sequence's K (or V) for
    one KV head as one contiguous run, exactly the memory SDPA reads: kernel against kernel, layout fixed."""
    per_seq = context // BLOCK
    blocks = (batch - 1) * HKV * per_seq + per_seq
    pool = torch.as_strided(k, (blocks, BLOCK, HKV, D), (BLOCK * D, D, context * D, 1))
    ids = torch.arange(batch, device=k.device)[:, None] * (HKV * per_seq) + torch.arange(per_seq, device=k.device)
    return pool, ids.to(torch.int32)


def head_outer_pool(cache: torch.Tensor) -> torch.Tensor:
    """The same values in a pool stored [Hkv, blocks, 16, D] (one pool per KV head), viewed [blocks, 16, Hkv, D]."""
    blocks, size, heads, dim = cache.shape
    pool = torch.empty(heads, blocks, size, dim, device=cache.device, dtype=cache.dtype).permute(1, 2, 0, 3)
    pool.copy_(cache)
    return pool


# cuDNN's decode kernel at 64 x 4096 runs 2 programs per SM over 128-key tiles (ncu_decode_64x4096.txt): the
# same shapes of ours, unsplit, over each layout. Does a longer contiguous run per request help on its memory?
LAYOUT_CONFIGS: list[tuple[str, DecodeConfig]] = [
    ("block_n=128 warps=4 stages=2 (2 per SM)", DecodeConfig(128, 4, 2, prefetch_ids=False, schedule="split")),
    ("block_n=128 warps=8 stages=2 (2 per SM)", DecodeConfig(128, 8, 2, prefetch_ids=False, schedule="split")),
    ("block_n=64 warps=4 stages=4 prefetch (2 per SM, 3 tiles in flight)", _deep(64, 4, 4, schedule="split")),
]


def sweep_layouts(copy_gbs: float, batch: int, context: int) -> dict[str, Any]:
    """Is the gap to SDPA the kernel or the memory it reads? The default kernel over four layouts of the same
    values, side by side with SDPA: the shuffled pool (the must-show), the pool in identity order, a
    head-outer pool (shuffled), and SDPA's own contiguous tensors read through a block table. At batch > 1 also
    the programs of LAYOUT_CONFIGS over each."""
    data, q, sdpa, want, nbytes = _case(batch, context)
    t_sdpa = time_graph(sdpa)
    out: dict[str, Any] = dict(batch=batch, context=context, sdpa_ms=round(t_sdpa, 5),
                               sdpa_pct_copy=_pct(nbytes, t_sdpa, copy_gbs), layouts=[])  # fmt: skip
    k_ident, v_ident, t_ident = pool_in_runs(data, data["block_tables"].numel(), seed=0)
    k_sdpa, t_sdpa_mem = sdpa_memory_as_pages(data["k"], batch, context)
    v_sdpa, _ = sdpa_memory_as_pages(data["v"], batch, context)
    layouts = [
        ("shuffled pool (must-show)", data["k_cache"], data["v_cache"], data["block_tables"]),
        ("pool in identity order", k_ident, v_ident, t_ident),
        ("head-outer pool, shuffled", head_outer_pool(data["k_cache"]), head_outer_pool(data["v_cache"]),
         data["block_tables"]),
        ("SDPA's contiguous tensors as pages", k_sdpa, v_sdpa, t_sdpa_mem),
        ("shuffled pool (must-show), again", data["k_cache"], data["v_cache"], data["block_tables"]),
    ]
    configs = [("default", None)] + (LAYOUT_CONFIGS if batch > 1 else [])
    for label, k, v, tables in layouts:
        pargs = (q, k, v, tables, data["context_lens"])
        for name, cfg in configs if "again" not in label else configs[:1]:
            kw = dict(max_context_len=context, config=cfg)
            err = max_err(pa.paged_decode_attention_triton(*pargs, **kw), want)
            assert err <= 2e-2, f"{label}, {name}: max abs error {err}"
            ms = time_graph(lambda pargs=pargs, kw=kw: pa.paged_decode_attention_triton(*pargs, **kw))
            entry = dict(layout=label, config=name, ms=round(ms, 5), pct_copy=_pct(nbytes, ms, copy_gbs),
                         vs_sdpa=round(t_sdpa / ms, 3), max_abs_err=err)  # fmt: skip
            out["layouts"].append(entry)
            print("  ", entry, flush=True)
    t_again = time_graph(sdpa)
    out["sdpa_ms_again"] = round(t_again, 5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="course/results")
    ap.add_argument("--name", default="decode_timeline_h200.json")
    ap.add_argument("--no-trace", action="store_true", help="only the sweep")
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, of {list(SWEEPS)}; '' for none")
    ap.add_argument("--tables", default="", help="pools shuffled in runs of blocks at these shapes ('1x32768,...')")
    ap.add_argument("--layouts", default="", help="the kernel over four layouts of the same values at these shapes ('64x4096,...')")
    ap.add_argument("--traces", default="", help="only the trace cases whose label holds one of these (comma-separated)")
    args = ap.parse_args(argv)
    path = Path(args.out) / args.name
    res: dict[str, Any] = dict(benchmark="decode_timeline", environment=environment(), traces=[])
    res["copy_gbs"] = copy_bandwidth_gbs()
    if not args.no_trace:
        for label, batch, context, how in TRACE_CASES:
            if not any(part in label for part in args.traces.split(",")):
                continue
            res["traces"].append(trace_case(label, batch, context, how, res["copy_gbs"]))
            torch.cuda.empty_cache()
            save_json(res, path)
    for name in filter(None, args.tables.split(",")):
        batch, context, _ = SWEEPS[name]
        res[f"tables_{name}"] = sweep_tables(res["copy_gbs"], batch, context, TABLE_RUNS)
        torch.cuda.empty_cache()
        save_json(res, path)
    for name in filter(None, args.layouts.split(",")):
        batch, context, _ = SWEEPS[name]
        res[f"layouts_{name}"] = sweep_layouts(res["copy_gbs"], batch, context)
        torch.cuda.empty_cache()
        save_json(res, path)
    for name in filter(None, args.sweeps.split(",")):
        batch, context, variants = SWEEPS[name]
        res[f"sweep_{name}"] = sweep(res["copy_gbs"], batch, context, variants)
        torch.cuda.empty_cache()
        save_json(res, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
