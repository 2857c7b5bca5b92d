"""Decode attention across batch sizes and context lengths: ours against SDPA and FlexAttention, one run.

    python -m nexus_lessons.bench decode_sweep --out course/results     # ~4-5 minutes on an H100
    python -m nexus_lessons.bench decode_sweep --quick --out /tmp/sweep  # CPU smoke test: tiny, no timing claims

Heads as in an 8B Llama: Hq 32, Hkv 8, D 128, bf16, 16-token blocks. Batches 1-256 x contexts 500-32768
(odd lengths included); a shape whose K/V (pool plus contiguous copy) would pass ``--memory-cap-gb`` is
skipped. Every shape gets fresh random data and a SHUFFLED block table (a pool that has been allocated and
freed for a while). Sides, on the same values:

* ``ours_eager``: ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens)``, the public
  call with its defaults, as a user's loop issues it (host work included); ``ours_graph``: that call
  captured in a CUDA graph.
* ``sdpa_eager`` / ``sdpa_graph``: ``F.scaled_dot_product_attention(enable_gqa=True)`` on a contiguous
  ``[B, Hkv, S, D]`` cache.
* ``flex``: ``flex_attention`` compiled (``dynamic=False``) with a block mask built once per shape
  (``create_block_mask``, 128-token blocks), as PyTorch documents it for decoding: torch.compile then
  lowers it to its split-KV FlexDecoding kernel. Timed in a CUDA graph.

Before timing, ours (and Flex) must equal SDPA within bf16 rounding. Times are medians of CUDA-event
timings; each timed call reads its own copy of the data (copies rotate until they far exceed the L2), so
no call finds its K/V in cache. The bound is read bandwidth: a read-only ``sum`` over 2 GiB, measured in
the same run, with the datasheet figure beside it; ``pct_read`` = bytes read / time / that bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import datasheet_gbps, environment, read_bandwidth_gbs, save_json, time_eager_ms, time_graph_ms

BATCHES = (1, 4, 16, 64, 256)
CONTEXTS = (500, 1023, 2047, 4096, 8191, 32768)
HEADS = dict(hq=32, hkv=8, d=128)
BLOCK = 16
DTYPE = torch.bfloat16
QUICK_BATCHES, QUICK_CONTEXTS, QUICK_HEADS = (1, 3), (20, 37), dict(hq=4, hkv=2, d=32)
SIDES = ("ours_eager", "ours_graph", "sdpa_eager", "sdpa_graph", "flex")
TOL = dict(atol=4e-3, rtol=2e-2)  # bf16 outputs of the same sums, both accumulated in float32
EAGER_TARGET = 1.3  # ours eager <= 1.3 x SDPA eager wherever SDPA takes >= 50 us
EAGER_TARGET_FROM_MS = 0.05


def bytes_read(batch: int, context: int, hq: int, hkv: int, d: int) -> int:
    """K and V of every context token, and q (block tables, ~0.1%, left out)."""
    return (2 * batch * context * hkv * d + batch * hq * d) * torch.finfo(DTYPE).bits // 8


def _copies(kv_bytes: int, device: torch.device) -> int:
    """Copies of the data to rotate through so that together they are 4x the L2: every call reads cold."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(4 * l2 / kv_bytes)))


def make_data(batch: int, context: int, copies: int, heads: dict, device: torch.device, gen: torch.Generator) -> dict:
    """``copies`` independent problems: one shuffled pool for all (each copy its own blocks), their block
    tables, and the same K/V laid out contiguously for SDPA / Flex, ``[copies, B, Hkv, S, D]``."""
    hq, hkv, d = heads["hq"], heads["hkv"], heads["d"]
    need = -(-context // BLOCK)
    blocks = copies * batch * need
    k_pool = torch.randn(blocks, BLOCK, hkv, d, device=device, dtype=DTYPE, generator=gen)
    v_pool = torch.randn(blocks, BLOCK, hkv, d, device=device, dtype=DTYPE, generator=gen)
    tables = torch.randperm(blocks, device=device, generator=gen).to(torch.int32).view(copies, batch, need)
    q = torch.randn(copies, batch, hq, d, device=device, dtype=DTYPE, generator=gen)

    def contiguous(pool: torch.Tensor) -> torch.Tensor:
        rows = pool[tables.long()].view(copies, batch, need * BLOCK, hkv, d)[:, :, :context]
        return rows.transpose(2, 3).contiguous()

    k, v = contiguous(k_pool), contiguous(v_pool)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return dict(k_pool=k_pool, v_pool=v_pool, tables=tables, q=q, k=k, v=v, lens=lens)


def _flex_setup(context: int, device: torch.device, compiled: bool) -> tuple[Callable, Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask

    fn = _compiled_flex() if compiled else flex_attention
    block_mask = create_block_mask(noop_mask, None, None, 1, context, device=str(device))
    return fn, block_mask


_FLEX: list = []


def _compiled_flex() -> Callable:
    if not _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):  # fmt: skip
            if hasattr(torch._dynamo.config, name):  # one compilation per shape: don't fall back to eager
                setattr(torch._dynamo.config, name, 1024)
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def _side(ms: float | None, nbytes: int, read_gbps: float | None, error: str | None = None) -> dict:
    pct = None if ms is None or not read_gbps else round(100 * nbytes / (ms * 1e-3) / (read_gbps * 1e9), 1)
    out: dict[str, Any] = dict(ms=None if ms is None else round(ms, 5), pct_read=pct)
    if error:
        out["error"] = error
    return out


def _time_wall_ms(calls: list[Callable], reps: int = 1) -> float:
    """Wall-clock ms per call (the CPU smoke run: no CUDA events there, and no claim is made)."""
    for call in calls:
        call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - t0) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def run_shape(batch: int, context: int, *, quick: bool, flex: bool, read_gbps: float | None, reps: int,
              gen: torch.Generator, device: torch.device) -> dict:  # fmt: skip
    from ..kernels import decode, paged_decode_attention

    heads = QUICK_HEADS if quick else HEADS
    nbytes = bytes_read(batch, context, **heads)
    copies = _copies(nbytes, device)
    data = make_data(batch, context, copies, heads, device, gen)
    q, tables, lens, kp, vp, k, v = (data[n] for n in ("q", "tables", "lens", "k_pool", "v_pool", "k", "v"))
    row: dict[str, Any] = dict(batch=batch, context=context, bytes_read=nbytes, copies=copies)

    def ours(c: int) -> torch.Tensor:
        return paged_decode_attention(q[c], kp, vp, tables[c], lens)

    def sdpa(c: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q[c][:, :, None], k[c], v[c], enable_gqa=True)[:, :, 0]

    want = sdpa(0)
    got = ours(0)
    row["max_abs_err_vs_sdpa"] = (got.float() - want.float()).abs().max().item()
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"ours != SDPA at {batch} x {context}: {m}")
    if device.type == "cuda" and not quick:
        plan = decode.plan_decode(q[0], kp, vp, tables[0], lens, None, None, None, None)
        row["plan"] = dict(splits=plan.splits, schedule=plan.schedule, block_n=plan.config.block_n,
                           num_warps=plan.config.num_warps)  # fmt: skip
    sides: dict[str, Callable[[int], torch.Tensor]] = dict(ours=ours, sdpa=sdpa)
    if flex:
        try:
            flex_fn, block_mask = _flex_setup(context, device, compiled=device.type == "cuda")

            def flex_call(c: int) -> torch.Tensor:
                return flex_fn(q[c][:, :, None], k[c], v[c], block_mask=block_mask, enable_gqa=True)[:, :, 0]

            out = flex_call(0)
            row["max_abs_err_flex_vs_sdpa"] = (out.float() - want.float()).abs().max().item()
            torch.testing.assert_close(out, want, **TOL, msg=lambda m: f"Flex != SDPA at {batch} x {context}: {m}")
            sides["flex"] = flex_call
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is recorded, not fatal
            row["flex"] = _side(None, nbytes, read_gbps, f"{type(exc).__name__}: {exc}"[:500])
    for name, side_fn in sides.items():
        calls = [lambda f=side_fn, c=c: f(c) for c in range(copies)]
        ways = ("graph",) if name == "flex" else ("eager", "graph")
        for way in ways:
            key = "flex" if name == "flex" else f"{name}_{way}"
            try:
                if device.type != "cuda":
                    ms = _time_wall_ms(calls) if way == "eager" or name == "flex" else None
                else:
                    ms = (time_eager_ms if way == "eager" else time_graph_ms)(calls, reps)
                row[key] = _side(ms, nbytes, read_gbps)
            except Exception as exc:  # noqa: BLE001 - record it; the other sides still run
                row[key] = _side(None, nbytes, read_gbps, f"{type(exc).__name__}: {exc}"[:500])
                if device.type == "cuda":
                    torch.cuda.synchronize()
    oe, se = row["ours_eager"].get("ms"), row["sdpa_eager"].get("ms")
    if oe and se:
        row["ours_eager_over_sdpa_eager"] = round(oe / se, 3)
    return row


def summary(rows: list[dict], quick: bool = False) -> dict:
    """Two checks from the rows: ours' eager cost against SDPA's, and the graphed share of the bound."""
    if quick:
        return {"note": "CPU smoke run: no timing claims"}
    judged = [r for r in rows if r.get("ours_eager_over_sdpa_eager") and (r["sdpa_eager"]["ms"] or 0) >= EAGER_TARGET_FROM_MS]
    worst = max(judged, key=lambda r: r["ours_eager_over_sdpa_eager"], default=None)
    return {
        "eager_rule": f"ours_eager <= {EAGER_TARGET} x sdpa_eager wherever sdpa_eager >= {EAGER_TARGET_FROM_MS} ms",
        "eager_rule_shapes": len(judged),
        "eager_rule_met": bool(judged) and all(r["ours_eager_over_sdpa_eager"] <= EAGER_TARGET for r in judged),
        "worst_eager_ratio": None if worst is None else dict(batch=worst["batch"], context=worst["context"],
                                                             ratio=worst["ours_eager_over_sdpa_eager"]),
        "ours_graph_pct_read": {f"{r['batch']}x{r['context']}": r["ours_graph"]["pct_read"] for r in rows
                                if r.get("ours_graph", {}).get("pct_read") is not None},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="course/results", help="folder for decode_sweep.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (Triton interpreter): checks the script")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per side (each over all copies)")
    ap.add_argument("--budget-s", type=float, default=270, help="start no new shape after this many seconds")
    ap.add_argument("--flex-budget-s", type=float, default=200,
                    help="after this many seconds, skip Flex (one compilation per shape) for the remaining shapes")
    ap.add_argument("--memory-cap-gb", type=float, default=40, help="skip shapes whose K/V pool + copy pass this")
    args = ap.parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("decode_sweep needs a CUDA GPU (or --quick for the CPU smoke run)")
    else:
        device = torch.device("cuda")
    t0 = time.perf_counter()
    env = environment()
    read_gbps = None if args.quick else round(read_bandwidth_gbs(), 1)
    results: dict[str, Any] = {
        "benchmark": "decode_sweep", **env, "quick": args.quick,
        "read_gbps": read_gbps, "datasheet_gbps": datasheet_gbps(env.get("device", "")) if not args.quick else None,
        "shape": dict(**(QUICK_HEADS if args.quick else HEADS), block_size=BLOCK, dtype=str(DTYPE),
                      block_tables="shuffled"),
        "timing": "ms: median ms per call over CUDA-event timed reps (eager: calls issued back to back, host work "
                  "included; graph: the calls replayed from one CUDA graph); flex is timed in a CUDA graph. "
                  "--quick: wall clock on the CPU, no claims",
        "bytes_read": "K and V of every context token, plus q",
        "pct_read": "100 x bytes_read / time / read_gbps (a read-only sum over 2 GiB, this run)",
        "rows": [], "skipped": [], "errors": [],
    }  # fmt: skip
    path = Path(args.out) / "decode_sweep.json"
    gen = torch.Generator(device=device).manual_seed(0)
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    heads = QUICK_HEADS if args.quick else HEADS
    print(f"{env.get('device')}: read {read_gbps} GB/s (datasheet {results['datasheet_gbps']})", flush=True)
    print(f"{'batch':>5} {'context':>7} {'ours eager':>10} {'ours graph':>10} {'sdpa eager':>10} {'sdpa graph':>10} "
          f"{'flex':>8}   ms (% of read bandwidth)", flush=True)  # fmt: skip
    for batch in batches:
        for context in contexts:
            pool = 2 * bytes_read(batch, context, **heads)  # the pool and its contiguous copy
            if pool > args.memory_cap_gb * 1e9:
                results["skipped"].append(dict(batch=batch, context=context, reason=f"K/V {pool / 1e9:.0f} GB > cap"))
                continue
            if time.perf_counter() - t0 > args.budget_s:
                results["skipped"].append(dict(batch=batch, context=context, reason="time budget"))
                continue
            flex = not args.no_flex and time.perf_counter() - t0 < args.flex_budget_s
            try:
                row = run_shape(batch, context, quick=args.quick, flex=flex, read_gbps=read_gbps,
                                reps=args.reps, gen=gen, device=device)  # fmt: skip
                if not flex and not args.no_flex:
                    row["flex"] = _side(None, row["bytes_read"], read_gbps, "skipped: --flex-budget-s")
            except AssertionError:
                results["errors"].append(dict(batch=batch, context=context, error=traceback.format_exc()[-2000:]))
                save_json(results, path)
                raise
            results["rows"].append(row)
            cells = [f"{row.get(s, {}).get('ms')} ({row.get(s, {}).get('pct_read')})" for s in SIDES]
            print(f"{batch:>5} {context:>7} " + " ".join(f"{c:>10}" for c in cells), flush=True)
            save_json({**results, "summary": summary(results["rows"], args.quick), "elapsed_s": round(time.perf_counter() - t0)},
                      path)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["summary"] = summary(results["rows"], args.quick)
    results["elapsed_s"] = round(time.perf_counter() - t0)
    save_json(results, path)
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {path} in {results['elapsed_s']} s")
    return results


SIDE_STYLES = {  # side -> (label, marker, colour)
    "ours_graph": ("ours, CUDA graph", "o", "C0"),
    "ours_eager": ("ours, eager default call", "o", "C9"),
    "sdpa_graph": ("SDPA (contiguous), CUDA graph", "s", "C1"),
    "sdpa_eager": ("SDPA (contiguous), eager", "s", "C8"),
    "flex": ("FlexAttention, compiled, CUDA graph", "^", "C2"),
}


def plot_decode_sweep(json_path: str | Path, ax=None):
    """One picture of ``decode_sweep.json``: % of the measured read bandwidth against the bytes each
    shape reads, every side as its own markers (a CPU smoke run has no bound: its ms are drawn instead)."""
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    rows = sorted(data["rows"], key=lambda r: r["bytes_read"])
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    use_pct = data.get("read_gbps") is not None
    key = "pct_read" if use_pct else "ms"
    for side, (label, marker, colour) in SIDE_STYLES.items():
        pts = [(r["bytes_read"] / 1e6, r[side][key]) for r in rows if r.get(side, {}).get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            label = label if use_pct else label.split(",")[0] + (", eager" if "eager" in side else "")
            ax.plot(xs, ys, marker=marker, color=colour, linestyle="none", alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("bytes read per call (MB): batch x context")
    if use_pct:
        ax.axhline(100, color="grey", linewidth=0.8)
        ax.set_ylabel("% of read bandwidth")
        sheet = data.get("datasheet_gbps")
        ax.set_title(f"Decode attention, {data.get('device')}: read bound {data['read_gbps']:.0f} GB/s measured"
                     + (f" ({sheet:.0f} datasheet)" if sheet else ""), fontsize=10)  # fmt: skip
    else:
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (CPU smoke run: no bound)")
        ax.set_title(f"Decode attention, {data.get('device')} (smoke run, no timing claims)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


if __name__ == "__main__":
    main()
