"""Lesson 02's Triton paged-attention kernels on a GPU, against PyTorch's attention, in one run.

    python -m nexus_lessons.bench.paged_kernels --out course/results

Heads as in an 8B Llama: Hq 32, Hkv 8, D 128, bf16, 16-token blocks with SHUFFLED block tables (a pool
that has been allocated and freed for a while; contiguous tables would flatter the gather).

* decode (one query per sequence) at batch 64 x 4096, 256 x 1024 and 1 x 32768 context tokens:
  ours (paged) vs ``F.scaled_dot_product_attention(enable_gqa=True)`` on a contiguous cache holding the
  same values vs ``flex_attention`` compiled, plain (no block mask) on that contiguous cache, i.e. Flex's
  best case, not a paged Flex. Decode is memory-bound, so each is also reported as GB/s and as % of the
  device-to-device copy bandwidth measured in the same run (bytes = K + V read + q read + out written).
* extend: 8 x 2048 new tokens, causal, no cache before them, vs SDPA ``is_causal`` on contiguous tensors
  (TFLOP/s, causal FLOPs counted exactly); 4 x (1024 cached + 512 new) vs SDPA with a lower-right
  causal mask.
* decode merge: with split-KV, the fused merge (the last split to arrive merges) and the two-kernel merge
  are timed side by side (``merge``). Diagnostic: the same decode over UNshuffled (identity-ordered)
  block tables (``diagnostic_unshuffled``), to tell whether the shuffle costs bandwidth; the headline
  stays shuffled.
* extend paths: "ours" is what the library runs (PagedKVCache passes the step's k/v as ``k_new, v_new``,
  with the default config); the variants time the paged-only kernel (``path=paged``), the contiguous
  new-K/V kernel with pointer loads (``path=pointer``) and with TMA descriptors (``path=tma``), and tile
  choices for the new path (session 3 also tried ``warp_specialize``: no gain, see the notes).
* variants: tile sizes, warps, pipeline stages and split counts, timed on the same data, so one GPU run
  says what to tune. A variant that fails to compile is recorded and skipped.

Every side is checked against the others before it is timed (the run fails on a wrong answer). Times are
medians: ``ms`` replays the call inside a CUDA graph (what a serving engine's decode step sees, no Python
launch cost); ``ms_eager`` is ``triton.testing.do_bench`` with the L2 flushed before every call (launch
cost included). Data are fresh random normals; every problem is larger than the 50 MB L2.
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
import torch.nn.functional as F

from .common import copy_bandwidth_gbs, environment, save_json

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_CASES = [(64, 4096), (256, 1024), (1, 32768)]
EXTEND_CASES = [(8, 0, 2048, True), (4, 1024, 512, False)]  # batch, cached, new, sweep variants
# --smoke: tiny shapes, any device (the interpreter on CPU), wall-clock timing: checks this script runs
SMOKE_DECODE_CASES = [(2, 70), (1, 300)]
SMOKE_EXTEND_CASES = [(1, 0, 40, True), (1, 30, 20, False)]
DEV = torch.device("cuda")


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def time_wall(fn: Callable[[], Any], reps: int = 1) -> float:
    """Median wall-clock ms (the --smoke path off the GPU, where nothing better exists)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _median(times)


def time_graph(fn: Callable[[], Any], rep_ms: int = 100) -> float:
    """Median ms per call with the calls replayed from a CUDA graph; falls back to do_bench."""
    if DEV.type != "cuda":
        return time_wall(fn)
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception:  # noqa: BLE001 - some callables cannot be captured; eager timing still works
        _sync()
        return time_eager(fn, rep_ms)


def time_eager(fn: Callable[[], Any], rep_ms: int = 100) -> float:
    """Median ms per call, L2 flushed before each call (triton.testing.do_bench)."""
    if DEV.type != "cuda":
        return time_wall(fn)
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    except TypeError:  # an older triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5])[0])


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


def unshuffled(data: dict[str, torch.Tensor], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same K/V values in a pool whose block tables are identity-ordered: sequence b's blocks are
    consecutive (b's block j at b * width + j). Diagnostic only: a long-lived pool is never like this."""
    tables = data["block_tables"].long()
    k = data["k_cache"][tables.flatten()]  # [B * width, BLOCK, Hkv, D], in table order
    v = data["v_cache"][tables.flatten()]
    ident = torch.arange(tables.numel(), device=DEV, dtype=torch.int32).view(tables.shape)
    return k, v, ident


def paged_cache(lens: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Random K/V for sequences of these lengths in a pool with shuffled block tables, plus the same
    values laid out contiguously ([B, Hkv, S, D], for SDPA / Flex; only for equal lengths)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [math.ceil(n / BLOCK) for n in lens]
    num_blocks = sum(need) + 8
    shape = (num_blocks, BLOCK, HKV, D)
    k_cache = torch.randn(shape, device=DEV, dtype=DTYPE, generator=g)
    v_cache = torch.randn(shape, device=DEV, dtype=DTYPE, generator=g)
    ids = torch.randperm(num_blocks, device=DEV, generator=g).to(torch.int32)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[at : at + n]
        at += n
    out = dict(k_cache=k_cache, v_cache=v_cache, block_tables=tables,
               context_lens=torch.tensor(lens, dtype=torch.int32, device=DEV))  # fmt: skip
    if len(set(lens)) == 1:  # contiguous copy of the same values: [B, Hkv, S, D]
        n = lens[0]
        for name, cache in (("k", k_cache), ("v", v_cache)):
            flat = cache[tables.long()].flatten(1, 2)[:, :n]  # [B, S, Hkv, D]
            out[name] = flat.transpose(1, 2).contiguous()
    return out


def decode_bytes(batch: int, context: int) -> int:
    elem = torch.finfo(DTYPE).bits // 8
    return (2 * batch * context * HKV * D + 2 * batch * HQ * D) * elem


def causal_flops(batch: int, q_len: int, cached: int) -> float:
    """2 matmuls x 2 flops x Hq x D per visible (query, key) pair; query i sees cached + i + 1 keys."""
    pairs = q_len * cached + q_len * (q_len + 1) / 2
    return 4.0 * batch * HQ * D * pairs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(name: str, err: float, tol: float) -> None:
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{name}: max abs error {err:.4g} exceeds {tol} -- not timing a wrong answer")


# ---------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------


class Run:
    """Collects results, saves the JSON after every case (a time-out still leaves what was measured)."""

    def __init__(self, path: Path, budget_s: float, variants: bool, flex: bool, max_variants: int | None) -> None:
        self.path = path
        self.max_variants = max_variants
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.variants = variants
        self.flex = flex
        self.reserve_s = 0.0  # decode variants leave this much of the budget to the extend cases
        self.only: str | None = None  # time only the decode variants whose label holds this
        self.results: dict[str, Any] = {
            "benchmark": "paged_kernels",
            "environment": environment(),
            "shape": dict(Hq=HQ, Hkv=HKV, D=D, block_size=BLOCK, dtype=str(DTYPE), block_tables="shuffled"),
            "timing": "ms: median per call replayed in a CUDA graph (triton do_bench_cudagraph); "
            "ms_eager: median of triton do_bench, L2 flushed before each call, launch cost included",
            "bytes": "decode: K + V read for every context token + q read + out written (block tables ignored)",
            "flex": "compiled flex_attention, plain (no block mask) on the contiguous cache: Flex's best case",
            "decode": [],
            "extend": [],
            "errors": [],
        }

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        save_json(self.results, self.path)

    def error(self, where: str, exc: BaseException) -> dict[str, str]:
        entry = {"where": where, "error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-3000:]}
        self.results["errors"].append(entry)
        print(f"  ! {where}: {entry['error'][:300]}", flush=True)
        _sync()
        return entry


def bandwidth_row(ms: float, nbytes: int, copy_gbs: float | None) -> dict[str, float | None]:
    gbs = nbytes / ms / 1e6
    return dict(ms=round(ms, 5), gbs=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1) if copy_gbs else None)


def decode_variants(batch: int, context: int, splits_auto: int) -> list[tuple[str, Any, int | None]]:
    from ..kernels.paged_attention import MAX_SPLITS, DecodeConfig

    # Sessions 2-3 settled block_n / warps / stages / evict_first / layout within 1-2% (notes/paged_kernels.md);
    # what still moves the long-context case is prefetching the block ids (the pipeliner then keeps two K/V
    # tiles in flight per program instead of one) together with the split count (one wave of programs).
    split = dict(schedule="split")  # tile variants of the split kernel itself, whatever "auto" would pick
    configs = [DecodeConfig(64, 4, 2, **split), DecodeConfig(64, 4, 3, True, **split),
               DecodeConfig(64, 4, 3, prefetch_ids=False, **split), DecodeConfig(64, 4, 3, prefetch_ids=True, **split),
               DecodeConfig(64, 4, 4, prefetch_ids=True, **split), DecodeConfig(32, 4, 4, prefetch_ids=True, **split),
               # fewer warps per program: fewer cross-warp reductions per tile, more programs per SM
               DecodeConfig(64, 2, 3, **split), DecodeConfig(64, 2, 2, **split), DecodeConfig(32, 1, 3, **split),
               DecodeConfig(32, 2, 3, **split),
               # 128-token tiles: half the per-tile chains (barriers, reductions) per byte, as cuDNN's 128-key tiles
               DecodeConfig(128, 4, 2, **split), DecodeConfig(128, 4, 2, prefetch_ids=True, **split)]  # fmt: skip

    def label(c: DecodeConfig) -> str:
        return (f"block_n={c.block_n} warps={c.num_warps} stages={c.num_stages}" + (" evict_first" if c.evict_first else "")
                + ("" if c.fused_merge is None else f" merge={'fused' if c.fused_merge else 'two_kernel'}")
                + (f" pdl={c.pdl}" if c.pdl != "off" else "")
                + ("" if c.prefetch_ids is None else f" prefetch_ids={'on' if c.prefetch_ids else 'off'}"))  # fmt: skip

    out: list[tuple[str, Any, int | None]] = [(label(c), c, None) for c in configs]
    # the schedule: the split grid (what "auto" keeps at these shapes) against one stream-K wave
    out += [("schedule=streamk", DecodeConfig(schedule="streamk"), None),
            ("schedule=streamk maxnreg=128", DecodeConfig(schedule="streamk", maxnreg=128), None)]  # fmt: skip
    by_length = max(1, context // 128)
    wanted = {1, 2, 4} if batch * HKV >= 132 else {24, 40, 48, 64}
    for s in sorted(wanted):
        if s <= min(MAX_SPLITS, by_length) and s != splits_auto:
            out.append((f"splits={s}", None, s))  # default config: block ids prefetched when split
            if s > 1:
                out.append((f"splits={s} prefetch_ids=off", DecodeConfig(prefetch_ids=False), s))
    if batch * HKV < 132:  # single-warp programs need more of them to fill the GPU
        for s in (64, 128):
            if s <= min(MAX_SPLITS, by_length):
                out.append((f"splits={s} block_n=32 warps=1 stages=4 prefetch_ids=on",
                            DecodeConfig(32, 1, 4, prefetch_ids=True), s))  # fmt: skip
    return out


def run_decode(run: Run, batch: int, context: int, copy_gbs: float | None) -> None:
    from dataclasses import replace

    from ..kernels import paged_decode_attention, paged_decode_attention_ref
    from ..kernels.paged_attention import (
        DecodeConfig,
        decode_plan,
        default_decode_config,
        num_sms,
        paged_decode_attention_triton,
    )

    name = f"decode {batch}x{context}"
    print(f"\n{name}", flush=True)
    row: dict[str, Any] = dict(case=name, batch=batch, context=context, bytes=decode_bytes(batch, context))
    run.results["decode"].append(row)
    data = paged_cache([context] * batch, seed=batch * 7 + context)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=DTYPE)
    args = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"])
    cfg = default_decode_config(DTYPE, D, q.device, batch * HKV)  # what the launcher picks for this grid
    splits, prefetch = decode_plan(batch, HKV, context, num_sms(q.device), cfg)
    row["ours_config"] = dict(block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, num_splits=splits,
                              prefetch_ids=prefetch)  # fmt: skip

    def ours():  # the bound on the lengths is passed, as PagedKVCache does
        return paged_decode_attention_triton(*args, max_context_len=context)

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)[:, :, 0]

    # correctness first: ours vs SDPA on the same values, and vs the PyTorch reference on a few sequences
    out = ours()
    ref_sdpa = sdpa()
    row["max_abs_err_vs_sdpa"] = max_err(out, ref_sdpa)
    check(f"{name} ours vs SDPA", row["max_abs_err_vs_sdpa"], 2e-2)
    few = slice(0, min(batch, 4))
    ref = paged_decode_attention_ref(q[few], data["k_cache"], data["v_cache"], data["block_tables"][few], data["context_lens"][few])
    row["max_abs_err_vs_reference"] = max_err(out[few], ref)
    check(f"{name} ours vs reference", row["max_abs_err_vs_reference"], 2e-2)

    nbytes = row["bytes"]
    row["ours_config"]["fused_merge"] = cfg.fused_merge if splits > 1 else None
    row["ours_config"]["pdl"] = cfg.pdl if splits > 1 else None
    row["ours"] = bandwidth_row(time_graph(ours), nbytes, copy_gbs)
    row["ours"]["ms_eager"] = round(time_eager(ours), 5)
    merges = {"fused": dict(fused_merge=True, pdl="off"), "two_kernel": dict(fused_merge=False, pdl="off"),
              "two_kernel_pdl_end": dict(fused_merge=False, pdl="end"),
              "two_kernel_pdl_start": dict(fused_merge=False, pdl="start")}  # fmt: skip
    if splits > 1:  # the merges side by side, back to back on the same data
        row["merge"] = {}
        for label, how in merges.items():
            mcfg = replace(cfg, **how)

            def merged(mcfg=mcfg):
                return paged_decode_attention_triton(*args, config=mcfg, max_context_len=context)

            err = max_err(merged(), ref_sdpa)
            check(f"{name} merge={label}", err, 2e-2)
            row["merge"][label] = dict(**bandwidth_row(time_graph(merged), nbytes, copy_gbs),
                                       ms_eager=round(time_eager(merged), 5), max_abs_err=err)  # fmt: skip
        print(f"  merge: {row['merge']}", flush=True)
    row["sdpa"] = bandwidth_row(time_graph(sdpa), nbytes, copy_gbs)
    row["sdpa"]["ms_eager"] = round(time_eager(sdpa), 5)
    row["speedup_vs_sdpa"] = round(row["sdpa"]["ms"] / row["ours"]["ms"], 3)
    # The public function: its argument checks are free, its value checks (validate=True) sync the GPU.
    row["public_fn_ms_eager"] = dict(
        validate_true=round(time_eager(lambda: paged_decode_attention(*args)), 5),
        validate_false=round(time_eager(lambda: paged_decode_attention(*args, validate=False)), 5),
    )
    print(f"  ours {row['ours']}  sdpa {row['sdpa']}", flush=True)

    if run.flex and DEV.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            qf = q[:, :, None]

            def flex_call():
                return flex(qf, data["k"], data["v"], enable_gqa=True)[:, :, 0]

            row["max_abs_err_flex_vs_sdpa"] = max_err(flex_call(), ref_sdpa)
            check(f"{name} flex vs SDPA", row["max_abs_err_flex_vs_sdpa"], 2e-2)
            row["flex"] = bandwidth_row(time_graph(flex_call), nbytes, copy_gbs)
            row["speedup_vs_flex"] = round(row["flex"]["ms"] / row["ours"]["ms"], 3)
            print(f"  flex {row['flex']}", flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["flex"] = run.error(f"{name} flex", exc)
    run.save()

    # Diagnostic, not the headline: identity-ordered block tables (each sequence's pages consecutive).
    if DEV.type == "cuda" or batch * context <= 4096:
        try:
            k_id, v_id, t_id = unshuffled(data, [context] * batch)
            diag_args = (q, k_id, v_id, t_id, data["context_lens"])
            diag = {"note": "diagnostic: the same values over UNshuffled (identity-ordered) block tables"}
            for label, mcfg in (("default", cfg),):

                def ident(mcfg=mcfg):
                    return paged_decode_attention_triton(*diag_args, config=mcfg, max_context_len=context)

                err = max_err(ident(), ref_sdpa)
                check(f"{name} unshuffled {label}", err, 2e-2)
                diag[label] = dict(**bandwidth_row(time_graph(ident), nbytes, copy_gbs), max_abs_err=err)
            row["diagnostic_unshuffled"] = diag
            print(f"  diagnostic, unshuffled tables: {diag}", flush=True)
            del k_id, v_id, diag_args
        except Exception as exc:  # noqa: BLE001
            row["diagnostic_unshuffled"] = run.error(f"{name} unshuffled", exc)
        run.save()

    if not run.variants:
        return
    row["variants"] = []
    wanted = None if run.only is None else run.only.split("|")
    chosen = [v for v in decode_variants(batch, context, splits) if wanted is None or any(w in v[0] for w in wanted)]
    for label, vcfg, vsplits in chosen[: run.max_variants]:
        if run.left_s() < 30 + run.reserve_s:
            row["variants"].append(dict(variant=label, skipped="time budget"))
            continue
        try:
            def call(vcfg=vcfg, vsplits=vsplits):
                return paged_decode_attention_triton(*args, config=vcfg, num_splits=vsplits, max_context_len=context)

            err = max_err(call(), ref_sdpa)
            check(f"{name} {label}", err, 2e-2)
            entry = dict(variant=label, **bandwidth_row(time_graph(call, rep_ms=50), nbytes, copy_gbs), max_abs_err=err)
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile must not stop the run
            entry = dict(variant=label, **run.error(f"{name} {label}", exc))
        row["variants"].append(entry)
        print(f"  {label:40s} {entry.get('ms', '-')} ms  {entry.get('pct_copy', '-')}%", flush=True)
        run.save()

    # The same values in a head-major pool ([blocks, Hkv, block, D], FlashInfer's "HND"), passed to the
    # same kernel as a strided view: each (page, head) is then one contiguous 4 KB run instead of 16
    # runs of 256 bytes. Tells whether the cache layout, not the kernel, limits the bandwidth.
    if run.left_s() < 30:
        return
    try:
        k_hnd = data["k_cache"].transpose(1, 2).contiguous().transpose(1, 2)
        v_hnd = data["v_cache"].transpose(1, 2).contiguous().transpose(1, 2)
        hnd_args = (q, k_hnd, v_hnd, data["block_tables"], data["context_lens"])
        for label, vcfg in (("layout=HND", None), ("layout=HND block_n=128 warps=8", DecodeConfig(128, 8, 2, schedule="split"))):
            def hnd(vcfg=vcfg):
                return paged_decode_attention_triton(*hnd_args, config=vcfg, max_context_len=context)

            err = max_err(hnd(), ref_sdpa)
            check(f"{name} {label}", err, 2e-2)
            entry = dict(variant=label, **bandwidth_row(time_graph(hnd, rep_ms=50), nbytes, copy_gbs), max_abs_err=err)
            row["variants"].append(entry)
            print(f"  {label:40s} {entry['ms']} ms  {entry['pct_copy']}%", flush=True)
        del k_hnd, v_hnd, hnd_args
    except Exception as exc:  # noqa: BLE001
        row["variants"].append(dict(variant="layout=HND", **run.error(f"{name} layout=HND", exc)))
    run.save()


def sdpa_backends(sdpa: Callable[[], torch.Tensor], error: Callable[[torch.Tensor], float],
                  rate: Callable[[float], dict[str, float]]) -> dict:
    """SDPA pinned to each backend in turn: which one the default picked matters for the comparison.
    ``error`` scores an output against the reference, ``rate`` turns milliseconds into the row's figures."""
    if DEV.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        if not hasattr(SDPBackend, backend):
            continue

        def pinned(backend=backend):
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                return sdpa()

        try:
            err = error(pinned())
            out[backend.lower()] = dict(**rate(time_graph(pinned, rep_ms=50)), max_abs_err=err)
        except Exception as exc:  # noqa: BLE001 - a backend that refuses these shapes is information too
            out[backend.lower()] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            _sync()
    print(f"  sdpa by backend: {out}", flush=True)
    return out


def extend_variants(sweep: bool) -> list[tuple[str, Any, bool]]:
    """(label, config, pass k_new). The three paths at their default tiles first, then (``sweep``) tiles
    for the new path and the paged path's runner-up."""
    from ..kernels.paged_attention import ExtendConfig, default_extend_config

    new = default_extend_config(DTYPE, D, DEV, False, True)
    paged = default_extend_config(DTYPE, D, DEV, False, False)

    def tiles(c: ExtendConfig) -> str:
        return f"block_m={c.block_m} block_n={c.block_n} warps={c.num_warps} stages={c.num_stages}"

    def at(c: ExtendConfig, mode: str) -> ExtendConfig:
        return ExtendConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, new_kv=mode)

    out = [(f"path=paged {tiles(paged)}", paged, False),
           (f"path=pointer {tiles(new)}", at(new, "pointer"), True),
           (f"path=tma {tiles(new)}", at(new, "tma"), True)]  # fmt: skip
    if not sweep:
        return out
    for n in (64, 128):
        for w in (4, 8):
            for st in (2, 3, 4):
                c = ExtendConfig(128, n, w, st)
                if (n, w, st) != (new.block_n, new.num_warps, new.num_stages):
                    out.append((f"path=tma {tiles(c)}", at(c, "tma"), True))
    for c in (ExtendConfig(128, 128, 8, 2), ExtendConfig(128, 64, 8, 2)):
        out.append((f"path=pointer {tiles(c)}", at(c, "pointer"), True))
    out.append((f"path=paged {tiles(ExtendConfig(128, 64, 8, 2))}", ExtendConfig(128, 64, 8, 2), False))
    return out


def run_extend(run: Run, batch: int, cached: int, new: int, variants: bool) -> None:
    from ..kernels import paged_prefill_attention_ref
    from ..kernels.paged_attention import default_extend_config, paged_prefill_attention_triton

    name = f"extend {batch}x({cached} cached + {new} new)" if cached else f"extend {batch}x{new} causal"
    print(f"\n{name}", flush=True)
    total = cached + new
    row: dict[str, Any] = dict(case=name, batch=batch, cached=cached, new=new, flops=causal_flops(batch, new, cached))
    run.results["extend"].append(row)
    data = paged_cache([total] * batch, seed=batch * 11 + total)
    q = torch.randn(batch * new, HQ, D, device=DEV, dtype=DTYPE)
    qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=DEV)
    args = (q, data["k_cache"], data["v_cache"], data["block_tables"], data["context_lens"], qsl)
    # the step's new K/V as packed rows (what PagedKVCache.attend passes): the last `new` of each sequence
    k_new = data["k"][:, :, cached:].transpose(1, 2).reshape(batch * new, HKV, D).contiguous()
    v_new = data["v"][:, :, cached:].transpose(1, 2).reshape(batch * new, HKV, D).contiguous()
    cfg = default_extend_config(DTYPE, D, q.device, False, True)
    row["ours_config"] = dict(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              path=f"k_new given, new_kv={cfg.new_kv}", note="what PagedKVCache runs by default")  # fmt: skip

    def ours(config=None, with_new: bool = True):
        if with_new:
            return paged_prefill_attention_triton(*args, k_new=k_new, v_new=v_new, max_query_len=new, config=config)
        return paged_prefill_attention_triton(*args, max_query_len=new, config=config)

    q4 = q.view(batch, new, HQ, D).transpose(1, 2).contiguous()  # [B, Hq, new, D]: the same values
    k4, v4 = data["k"], data["v"]
    sdpa_note = "F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)"
    if cached == 0:
        def sdpa():
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
    else:
        try:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(new, total)
            F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias, enable_gqa=True)
            sdpa_note = "F.scaled_dot_product_attention(attn_mask=causal_lower_right, enable_gqa=True)"

            def sdpa():
                return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias, enable_gqa=True)
        except Exception:  # noqa: BLE001 - older torch: an explicit boolean mask over expanded heads
            mask = torch.ones(new, total, dtype=torch.bool, device=DEV).tril(cached)
            k_full, v_full = k4.repeat_interleave(HQ // HKV, 1), v4.repeat_interleave(HQ // HKV, 1)
            sdpa_note = "F.scaled_dot_product_attention(attn_mask=bool lower-right mask), K/V heads expanded"

            def sdpa():
                return F.scaled_dot_product_attention(q4, k_full, v_full, attn_mask=mask)
    row["sdpa_call"] = sdpa_note

    out = ours()
    ref_sdpa = sdpa().transpose(1, 2).reshape(batch * new, HQ, D)
    row["max_abs_err_vs_sdpa"] = max_err(out, ref_sdpa)
    check(f"{name} ours vs SDPA", row["max_abs_err_vs_sdpa"], 3e-2)
    rows = slice(0, new)  # the first sequence against the PyTorch reference
    ref = paged_prefill_attention_ref(q[rows], data["k_cache"], data["v_cache"], data["block_tables"][:1],
                                      data["context_lens"][:1], qsl[:2])  # fmt: skip
    row["max_abs_err_vs_reference"] = max_err(out[rows], ref)
    check(f"{name} ours vs reference", row["max_abs_err_vs_reference"], 3e-2)

    flops = row["flops"]
    t_ours, t_sdpa = time_graph(ours), time_graph(sdpa)
    row["ours"] = dict(ms=round(t_ours, 4), tflops=round(flops / t_ours / 1e9, 1), ms_eager=round(time_eager(ours), 4))
    row["sdpa"] = dict(ms=round(t_sdpa, 4), tflops=round(flops / t_sdpa / 1e9, 1))
    row["ours_pct_of_sdpa_tflops"] = round(100 * t_sdpa / t_ours, 1)
    print(f"  ours {row['ours']}  sdpa {row['sdpa']}  ({row['ours_pct_of_sdpa_tflops']}% of SDPA)", flush=True)
    row["sdpa_by_backend"] = sdpa_backends(
        sdpa, lambda o: max_err(o.transpose(1, 2).reshape(batch * new, HQ, D), ref_sdpa),
        lambda t: dict(ms=round(t, 4), tflops=round(flops / t / 1e9, 1)))  # fmt: skip
    run.save()

    if not run.variants:
        return
    row["variants"] = []
    time_extend_variants(run, row, name, extend_variants(variants)[: run.max_variants], ours, ref_sdpa, flops, t_sdpa)


def time_extend_variants(run: Run, row: dict, name: str, chosen: list, ours: Callable, ref_sdpa: torch.Tensor,
                         flops: float, t_sdpa: float) -> None:  # fmt: skip
    for label, vcfg, with_new in chosen:
        if run.left_s() < 30:
            row["variants"].append(dict(variant=label, skipped="time budget"))
            continue
        try:
            err = max_err(ours(vcfg, with_new), ref_sdpa)
            check(f"{name} {label}", err, 3e-2)
            t = time_graph(lambda vcfg=vcfg, with_new=with_new: ours(vcfg, with_new), rep_ms=50)
            entry = dict(variant=label, ms=round(t, 4), tflops=round(flops / t / 1e9, 1),
                         pct_of_sdpa=round(100 * t_sdpa / t, 1), max_abs_err=err)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile must not stop the run
            entry = dict(variant=label, **run.error(f"{name} {label}", exc))
        row["variants"].append(entry)
        print(f"  {label:50s} {entry.get('ms', '-')} ms  {entry.get('tflops', '-')} TFLOP/s", flush=True)
        run.save()


def _cell(value: Any, width: int) -> str:
    return f"{'-' if value is None else value:>{width}}"


def summary(results: dict[str, Any]) -> str:
    """The short table printed at the end (everything else is in the JSON)."""
    lines = [f"{results['environment'].get('device')}  copy {results.get('copy_gbs')} GB/s", ""]
    lines.append(f"{'decode':22s} {'ours ms':>9s} {'%copy':>6s} {'sdpa ms':>9s} {'%copy':>6s} {'flex ms':>9s} {'sdpa/ours':>9s}")
    for r in results["decode"]:
        o, s, f = r.get("ours", {}), r.get("sdpa", {}), r.get("flex", {})
        best = min((v for v in r.get("variants", []) if "ms" in v), key=lambda v: v["ms"], default=None)
        lines.append(
            f"{r['case']:22s} {_cell(o.get('ms'), 9)} {_cell(o.get('pct_copy'), 6)} {_cell(s.get('ms'), 9)} "
            f"{_cell(s.get('pct_copy'), 6)} {_cell(f.get('ms'), 9)} {_cell(r.get('speedup_vs_sdpa'), 9)}"
            + (f"   best variant: {best['variant']} {best['ms']} ms ({best['pct_copy']}%)" if best else "")
        )
    lines.append("")
    lines.append(f"{'extend':34s} {'ours ms':>9s} {'TFLOP/s':>8s} {'sdpa ms':>9s} {'TFLOP/s':>8s} {'% of sdpa':>9s}")
    for r in results["extend"]:
        o, s = r.get("ours", {}), r.get("sdpa", {})
        best = min((v for v in r.get("variants", []) if "ms" in v), key=lambda v: v["ms"], default=None)
        lines.append(
            f"{r['case']:34s} {_cell(o.get('ms'), 9)} {_cell(o.get('tflops'), 8)} {_cell(s.get('ms'), 9)} "
            f"{_cell(s.get('tflops'), 8)} {_cell(r.get('ours_pct_of_sdpa_tflops'), 9)}"
            + (f"   best variant: {best['variant']} {best['tflops']} TFLOP/s" if best else "")
        )
    if results["errors"]:
        lines.append(f"\n{len(results['errors'])} error(s) recorded in the JSON: "
                     + "; ".join(e["where"] for e in results["errors"]))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="course/results", help="folder for paged_kernels.json")
    parser.add_argument("--no-variants", action="store_true", help="skip the tuning sweep")
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--budget-s", type=float, default=420, help="start no new variant after this long")
    parser.add_argument("--decode-only", action="store_true", help="skip the extend cases (a decode tuning run)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, two variants, any device (Triton interpreter on CPU): checks the script")  # fmt: skip
    parser.add_argument("--only", default=None,
                        help="time only the decode variants whose label holds one of these |-separated texts")  # fmt: skip
    args = parser.parse_args(argv)
    smoke = args.smoke
    if not torch.cuda.is_available():
        if not smoke:
            print("paged_kernels needs a CUDA GPU (or --smoke); kernel correctness on CPU: tests/test_kernels.py")
            return 2
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        DEV = torch.device("cpu")
    name = "paged_kernels_smoke.json" if smoke else "paged_kernels.json"
    run = Run(Path(args.out) / name, args.budget_s, not args.no_variants, not args.no_flex, 3 if smoke else None)
    run.only = args.only
    run.reserve_s = 0.0 if smoke or args.decode_only else 0.4 * args.budget_s  # time kept for the extend cases
    failed = False
    run.results["copy_gbs"] = round(copy_bandwidth_gbs(), 1) if DEV.type == "cuda" else None
    print(f"device-to-device copy: {run.results['copy_gbs']} GB/s (read + write)", flush=True)
    for batch, context in SMOKE_DECODE_CASES if smoke else DECODE_CASES:
        try:
            run_decode(run, batch, context, run.results["copy_gbs"])
        except Exception as exc:  # noqa: BLE001 - keep going: one broken case must not hide the others
            run.error(f"decode {batch}x{context}", exc)
            failed = True
        run.save()
    for batch, cached, new, variants in [] if args.decode_only else SMOKE_EXTEND_CASES if smoke else EXTEND_CASES:
        try:
            run_extend(run, batch, cached, new, variants)
        except Exception as exc:  # noqa: BLE001
            run.error(f"extend {batch}x{cached}+{new}", exc)
            failed = True
        run.save()
    print("\n" + summary(run.results))
    print(f"\nwrote {run.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
