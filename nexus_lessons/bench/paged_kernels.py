"""Lesson 02's kernels on a GPU beyond the decode sweep: the cost of paging, waves, and extend, in one run.

    python -m nexus_lessons.bench paged_kernels --out course/results      # ~1-2 minutes on an H100
    python -m nexus_lessons.bench paged_kernels --smoke --out /tmp/pk     # CPU smoke test, no timing claims

Heads as in an 8B Llama: Hq 32, Hkv 8, D 128, bf16, 16-token blocks, fresh random data. ``decode_sweep``
has the headline (ours against SDPA and Flex over batch x context); this script measures three things the
lesson explains, each side by side on the same values, CUDA-graphed, and checked before it is timed:

* ``paging``: the same decode over a SHUFFLED pool (a pool that has been allocated and freed for a
  while), over the pool in identity order (each sequence's blocks consecutive), and SDPA on a contiguous
  cache: what gathering through a block table costs.
* ``waves``: the split grid against the schedule the launcher picks. 64 x 4096 with 8 KV heads is 512
  programs; 68 x 4096 is 544, a second wave all but empty; 64 sequences of 1-8191 tokens leave the grid
  waiting for the longest (the caller passes the mean length, as ``PagedKVCache`` does, and stream-K
  shares the tiles out evenly).
* ``extend``: 8 x 2048 new tokens causal, and 4 x (1024 cached + 512 new), ours (the call
  ``PagedKVCache`` makes: the new K/V as packed rows) against SDPA, TFLOP/s, eager and graphed.

The bound for decode is read bandwidth (a read-only ``sum``, this run; the datasheet figure beside it).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import datasheet_gbps, environment, read_bandwidth_gbs, save_json, time_eager_ms, time_graph_ms

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
PAGING_CASES = [(64, 4096), (256, 1024), (1, 32768)]
WAVE_CASES = [("64 x 4096", [4096] * 64), ("68 x 4096", [4096] * 68), ("64 mixed 1-8191", "mixed")]
EXTEND_CASES = [(8, 0, 2048), (4, 1024, 512)]  # batch, cached, new
SMOKE = dict(paging=[(2, 40)], waves=[("2 x 40", [40] * 2), ("4 mixed", [1, 5, 90, 33])], extend=[(2, 30, 20)])
TOL = dict(atol=4e-3, rtol=2e-2)


def paged(lens: list[int], device: torch.device, gen: torch.Generator, in_order: bool = False) -> dict:
    """Random K/V for sequences of these lengths in a pool (shuffled, or each sequence's blocks consecutive),
    their block tables, and, for equal lengths, the same values contiguous ([B, Hkv, S, D], for SDPA)."""
    need = [math.ceil(n / BLOCK) for n in lens]
    blocks = sum(need)
    k_pool = torch.randn(blocks, BLOCK, HKV, D, device=device, dtype=DTYPE, generator=gen)
    v_pool = torch.randn(blocks, BLOCK, HKV, D, device=device, dtype=DTYPE, generator=gen)
    order = torch.arange(blocks, device=device) if in_order else torch.randperm(blocks, device=device, generator=gen)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[at : at + n].to(torch.int32)
        at += n
    out = dict(k_pool=k_pool, v_pool=v_pool, tables=tables,
               lens=torch.tensor(lens, dtype=torch.int32, device=device))  # fmt: skip
    if len(set(lens)) == 1:
        for name, pool in (("k", k_pool), ("v", v_pool)):
            rows = pool[tables.long()].flatten(1, 2)[:, : lens[0]]  # [B, S, Hkv, D]
            out[name] = rows.transpose(1, 2).contiguous()
    return out


def identity_ordered(data: dict) -> dict:
    """The same values, the pool rearranged so that each sequence's blocks are consecutive."""
    flat = data["tables"].flatten().long()
    ident = torch.arange(flat.numel(), device=flat.device, dtype=torch.int32).view(data["tables"].shape)
    return {**data, "k_pool": data["k_pool"][flat], "v_pool": data["v_pool"][flat], "tables": ident}


class Timer:
    """Graphed (and eager) medians on a GPU; one wall-clock call in the CPU smoke run (no claims)."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def graph(self, call: Callable[[], Any]) -> float:
        if self.device.type != "cuda":
            return self.wall(call)
        return time_graph_ms([call], self.reps)

    def eager(self, call: Callable[[], Any]) -> float:
        if self.device.type != "cuda":
            return self.wall(call)
        return time_eager_ms([call], self.reps)

    @staticmethod
    def wall(call: Callable[[], Any]) -> float:
        call()
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3


def decode_bytes(lens: list[int]) -> int:
    return (2 * sum(lens) * HKV * D + len(lens) * HQ * D) * torch.finfo(DTYPE).bits // 8


def rate(ms: float, nbytes: int, read_gbps: float | None) -> dict:
    pct = None if not read_gbps else round(100 * nbytes / (ms * 1e-3) / (read_gbps * 1e9), 1)
    return dict(ms=round(ms, 5), pct_read=pct)


def run_paging(batch: int, context: int, timer: Timer, read_gbps: float | None, device, gen) -> dict:
    from ..kernels import paged_decode_attention

    lens = [context] * batch
    data = paged(lens, device, gen)
    ident = identity_ordered(data)
    q = torch.randn(batch, HQ, D, device=device, dtype=DTYPE, generator=gen)
    nbytes = decode_bytes(lens)

    def shuffled():
        return paged_decode_attention(q, data["k_pool"], data["v_pool"], data["tables"], data["lens"])

    def in_order():
        return paged_decode_attention(q, ident["k_pool"], ident["v_pool"], ident["tables"], ident["lens"])

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], data["k"], data["v"], enable_gqa=True)[:, :, 0]

    want = sdpa()
    torch.testing.assert_close(shuffled(), want, **TOL)
    torch.testing.assert_close(in_order(), want, **TOL)
    return dict(batch=batch, context=context, bytes_read=nbytes, shuffled=rate(timer.graph(shuffled), nbytes, read_gbps),
                in_order=rate(timer.graph(in_order), nbytes, read_gbps), sdpa=rate(timer.graph(sdpa), nbytes, read_gbps))  # fmt: skip


def run_waves(name: str, lens: list[int], timer: Timer, read_gbps: float | None, device, gen) -> dict:
    """The split grid (forced: the split count the plan picks, the split kernel whatever the grid) against
    the launcher's choice, with the host facts ``PagedKVCache`` passes (max and mean length)."""
    from ..kernels import decode, paged_decode_attention, paged_decode_attention_ref

    data = paged(lens, device, gen)
    q = torch.randn(len(lens), HQ, D, device=device, dtype=DTYPE, generator=gen)
    nbytes = decode_bytes(lens)
    args = (q, data["k_pool"], data["v_pool"], data["tables"], data["lens"])
    hints = dict(max_context_len=max(lens), mean_context_len=sum(lens) / len(lens))
    plan = decode.plan_decode(*args, None, hints["max_context_len"], hints["mean_context_len"], None)

    def split():
        return paged_decode_attention(*args, num_splits=plan.splits, max_context_len=hints["max_context_len"])

    def auto():
        return paged_decode_attention(*args, **hints)

    few = slice(0, min(len(lens), 4))
    want = paged_decode_attention_ref(q[few], data["k_pool"], data["v_pool"], data["tables"][few], data["lens"][few])
    for fn in (split, auto):
        torch.testing.assert_close(fn()[few], want, **TOL)
    sms = decode.num_sms(device)
    # programs of the compiled split kernel one SM holds at once (registers, shared memory): a wave is per_sm x sms
    per_sm = decode.programs_per_sm(decode._decode_split_kernel,
                                    decode._split_args(*args, 1.0, plan, hints["max_context_len"])[1], plan.meta, device)
    return dict(case=name, batch=len(lens), programs=len(lens) * HKV * plan.splits, sms=sms, programs_per_sm=per_sm,
                splits=plan.splits, auto_schedule=plan.schedule, bytes_read=nbytes,
                split=rate(timer.graph(split), nbytes, read_gbps),
                auto=rate(timer.graph(auto), nbytes, read_gbps))  # fmt: skip


def run_extend(batch: int, cached: int, new: int, timer: Timer, device, gen) -> dict:
    from ..kernels import paged_prefill_attention, paged_prefill_attention_ref

    total = cached + new
    data = paged([total] * batch, device, gen)
    q = torch.randn(batch * new, HQ, D, device=device, dtype=DTYPE, generator=gen)
    qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=device)
    # the step's new K/V as packed rows, as PagedKVCache passes them: the last `new` tokens of each sequence
    k_new = data["k"][:, :, cached:].transpose(1, 2).reshape(batch * new, HKV, D).contiguous()
    v_new = data["v"][:, :, cached:].transpose(1, 2).reshape(batch * new, HKV, D).contiguous()
    args = (q, data["k_pool"], data["v_pool"], data["tables"], data["lens"], qsl)

    def ours():
        return paged_prefill_attention(*args, k_new=k_new, v_new=v_new, max_query_len=new)

    q4 = q.view(batch, new, HQ, D).transpose(1, 2)
    if cached == 0:
        def sdpa():
            return F.scaled_dot_product_attention(q4, data["k"], data["v"], is_causal=True, enable_gqa=True)
    else:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(new, total)

        def sdpa():
            return F.scaled_dot_product_attention(q4, data["k"], data["v"], attn_mask=bias, enable_gqa=True)

    out = ours()
    torch.testing.assert_close(out, sdpa().transpose(1, 2).reshape(batch * new, HQ, D), **TOL)
    ref = paged_prefill_attention_ref(q[:new], data["k_pool"], data["v_pool"], data["tables"][:1], data["lens"][:1],
                                      qsl[:2])  # fmt: skip
    torch.testing.assert_close(out[:new], ref, **TOL)
    flops = 4.0 * batch * HQ * D * (new * cached + new * (new + 1) / 2)  # causal pairs counted exactly
    row: dict[str, Any] = dict(batch=batch, cached=cached, new=new, flops=flops)
    for side, fn in (("ours", ours), ("sdpa", sdpa)):
        for way in ("graph", "eager"):
            ms = getattr(timer, way)(fn)
            row[f"{side}_{way}"] = dict(ms=round(ms, 5), tflops=round(flops / ms / 1e9, 1))
    row["ours_over_sdpa_tflops_graph"] = round(row["sdpa_graph"]["ms"] / row["ours_graph"]["ms"], 3)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="course/results", help="folder for paged_kernels.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter): checks the script")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    global HQ, HKV, D
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        device = torch.device("cpu")
        HQ, HKV, D = 4, 2, 32  # the interpreter runs every program in numpy: small heads
    elif not torch.cuda.is_available():
        raise SystemExit("paged_kernels needs a CUDA GPU (or --smoke for the CPU smoke run)")
    else:
        device = torch.device("cuda")
    t0 = time.perf_counter()
    env = environment()
    read_gbps = None if args.smoke else round(read_bandwidth_gbs(), 1)
    results: dict[str, Any] = {
        "benchmark": "paged_kernels", **env, "smoke": args.smoke, "read_gbps": read_gbps,
        "datasheet_gbps": None if args.smoke else datasheet_gbps(env.get("device", "")),
        "shape": dict(Hq=HQ, Hkv=HKV, D=D, block_size=BLOCK, dtype=str(DTYPE)),
        "timing": "ms: median of CUDA-event timed reps; decode sides replayed from a CUDA graph; extend both "
                  "graphed and eager (calls back to back). --smoke: one wall-clock call on the CPU, no claims",
        "pct_read": "100 x bytes read (K and V of every context token, plus q) / time / read_gbps",
        "paging": [], "waves": [], "extend": [],
    }  # fmt: skip
    path = Path(args.out) / "paged_kernels.json"
    timer = Timer(device, args.reps)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{env.get('device')}: read {read_gbps} GB/s", flush=True)
    for batch, context in SMOKE["paging"] if args.smoke else PAGING_CASES:
        results["paging"].append(run_paging(batch, context, timer, read_gbps, device, gen))
        print("paging", results["paging"][-1], flush=True)
        save_json(results, path)
    rng = torch.Generator().manual_seed(1)
    for name, lens in SMOKE["waves"] if args.smoke else WAVE_CASES:
        if lens == "mixed":
            lens = torch.randint(1, 8192, (64,), generator=rng).tolist()
        results["waves"].append(run_waves(name, lens, timer, read_gbps, device, gen))
        print("waves", results["waves"][-1], flush=True)
        save_json(results, path)
    for batch, cached, new in SMOKE["extend"] if args.smoke else EXTEND_CASES:
        results["extend"].append(run_extend(batch, cached, new, timer, device, gen))
        print("extend", results["extend"][-1], flush=True)
        save_json(results, path)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["elapsed_s"] = round(time.perf_counter() - t0)
    save_json(results, path)
    print(f"wrote {path} in {results['elapsed_s']} s")
    return results


if __name__ == "__main__":
    main()
