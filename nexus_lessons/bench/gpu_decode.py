"""Batch-1 decode of a 1B-parameter Llama-shaped model on a GPU: ours against transformers, one run.

    python -m nexus_lessons.bench.gpu_decode --out course/results/gpu_decode_h200.json

Random weights (nothing can be downloaded); the shape is Llama-3.2-1B's with a 32k vocabulary and tied
embeddings: 1.04B parameters, 2.08 GB in bf16. Every decode step must read all of them once, so
bytes / copy-bandwidth is the floor on time per token; we report how close each side gets.
Before timing, float32 greedy tokens of ours are asserted equal to transformers' `generate`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
import torch._inductor.config

from ..cuda_graph import CUDAGraphDecoder
from ..generate import generate
from ..loading import from_hf
from .common import copy_bandwidth_gbs, environment, save_json

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rms_norm_eps=1e-5)


def _hf_model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(dtype).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early, on either side
    hf.generation_config.pad_token_id = 0
    return hf


def _time_hf(hf, ids, n, static: bool) -> float:
    kw = dict(max_new_tokens=n, do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
    hf.generate(ids, **{**kw, "max_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hf.generate(ids, **kw)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _time_ours_eager(model, ids, n) -> float:
    generate(model, ids, 8, cache="static")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, ids, n, cache="static")
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _time_graph(dec: CUDAGraphDecoder, ids, n, reps: int) -> tuple[float, float]:
    """(decode tokens/s from the median of `reps` timed runs, end-to-end tokens/s of one run)."""
    dec.generate(ids, n)  # capture + warm-up
    times = []
    for _ in range(reps):
        B = dec.prefill(ids)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dec.decode(B, n - 1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.generate(ids, n)
    torch.cuda.synchronize()
    e2e = n / (time.perf_counter() - t0)
    times.sort()
    return (n - 1) / times[len(times) // 2], e2e


def profile_step(dec: CUDAGraphDecoder, ids, steps: int = 10) -> list[dict]:
    """GPU time per decode step by kernel name (the step run without its graph, so each kernel shows)."""
    from torch.profiler import ProfilerActivity, profile

    B = dec.prefill(ids)
    use_graph, dec.use_graph = dec.use_graph, False
    dec.decode(B, 3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.decode(B, steps)
        torch.cuda.synchronize()
    dec.use_graph = use_graph
    rows = []
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                rows.append({"kernel": e.key[:120], "calls_per_step": e.count / steps, "us_per_step": t / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"kernel time per step {total:.1f} us in {sum(r['calls_per_step'] for r in rows):.0f} launches")
    for r in rows[:25]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
    return rows[:40]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="course/results/gpu_decode_h200.json")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true", help="skip timing transformers (exploration runs only)")
    ap.add_argument("--more-variants", action="store_true",
                    help="also time the variants that lost before (reduction attention, cuBLAS GEMVs)")
    ap.add_argument("--profile", action="store_true", help="record where a compiled decode step spends its time")
    ap.add_argument("--only", nargs="*", default=None, help="time only the variants whose name contains one of these")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; the course shows its committed results instead")
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {"benchmark": "gpu_decode", **environment(), "config": LLAMA_1B,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    copy_gbs = copy_bandwidth_gbs()
    results["copy_bandwidth_gbs"] = copy_gbs
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (1, args.prompt_len), generator=g).cuda()
    max_len = args.prompt_len + args.new_tokens

    # 1. Correctness in float32: our graph decoder (both attentions), fused, against transformers' greedy generate.
    hf = _hf_model(torch.float32)
    ours = from_hf(hf).fuse_projections(fused_activation=True, fused_norm=True)
    n_check = 32
    ref = hf.generate(ids, max_new_tokens=n_check, do_sample=False)
    check = {"new_tokens": n_check, "nocache_equals_transformers": bool((ref == generate(ours, ids, n_check)).all())}
    for attn in ("sdpa", "reduce", "paged"):
        got = CUDAGraphDecoder(ours, 1, max_len, attention=attn).generate(ids, n_check)
        check[f"graph_{attn}_equals_transformers"] = bool((ref == got).all())
    assert all(check.values()), f"our decoders disagree with transformers in float32: {check}"
    # The GEMV kernels (autotuned here, in float32), asserted after the others so a failure names itself.
    ours.unfuse_projections().fuse_projections(fused_gemv=True)
    for attn in ("sdpa", "paged", "paged+rope"):
        dec = CUDAGraphDecoder(ours, 1, max_len, attention=attn.removesuffix("+rope"), fused_rope=attn.endswith("+rope"))
        check[f"graph_{attn}_gemv_kernels_equals_transformers"] = bool((ref == dec.generate(ids, n_check)).all())
    results["check_float32"] = check
    print("float32 check:", check, flush=True)
    assert all(check.values()), f"our GEMV kernels disagree with transformers in float32: {check}"
    del hf, ours
    torch.cuda.empty_cache()

    # 2. Speed in bf16.
    hf = _hf_model(torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied embedding counted once
    c = LLAMA_1B
    kv_bytes_per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2
    floor_s = weight_bytes / (copy_gbs * 1e9)
    results.update(weight_bytes=weight_bytes, floor_tokens_per_s=1 / floor_s)
    rows = {}
    if not args.skip_hf:
        rows["transformers generate (dynamic cache)"] = {"tokens_per_s": _time_hf(hf, ids, args.hf_new_tokens, False)}
        rows["transformers generate (static cache)"] = {"tokens_per_s": _time_hf(hf, ids, 16, True)}
    ours = from_hf(hf)
    del hf
    torch.cuda.empty_cache()
    rows["ours: generate, static cache, eager"] = {"tokens_per_s": _time_ours_eager(ours, ids, args.hf_new_tokens)}
    # (name, fuse projections, silu_and_mul kernel, rms_norm kernel, GEMV kernels, compile,
    #  coordinate-descent GEMVs, attention, RoPE + page write kernel)
    variants = [("ours: CUDA graph", False, False, False, False, False, False, "sdpa"),
                ("ours: CUDA graph + fused projections", True, False, False, False, False, False, "sdpa")]
    if not args.no_compile:
        variants += [
            ("ours: compile + CUDA graph + fused projections", True, False, False, False, True, True, "sdpa"),
            ("ours: ... + silu_and_mul kernel", True, True, False, False, True, True, "sdpa"),
            ("ours: ... + silu_and_mul kernel + paged decode attention", True, True, False, False, True, True, "paged"),
            ("ours: compile + CUDA graph + GEMV kernels", True, False, False, True, True, True, "sdpa"),
            ("ours: compile + CUDA graph + GEMV kernels + paged decode attention", True, False, False, True, True,
             True, "paged"),
            ("ours: compile + CUDA graph + GEMV kernels + paged decode attention + RoPE/page-write kernel", True,
             False, False, True, True, True, "paged+rope"),
        ]
        if args.more_variants:
            variants += [
                ("ours: compile + CUDA graph + layer GEMV kernels (inductor lm_head) + paged decode attention + "
                 "RoPE/page-write kernel", True, False, False, ["attention", "mlp"], True, True, "paged+rope"),
                ("ours: ... + silu_and_mul kernel + attention GEMV kernels", True, True, False, ["attention"], True,
                 True, "sdpa"),
                ("ours: ... + silu_and_mul kernel + attention GEMV kernels + paged decode attention", True, True,
                 False, ["attention"], True, True, "paged"),
                ("ours: ... + silu_and_mul + rms_norm kernels", True, True, True, False, True, True, "sdpa"),
                ("ours: ... + silu_and_mul kernel + reduction attention", True, True, False, False, True, True,
                 "reduce"),
                ("ours: compile (cuBLAS GEMV) + CUDA graph + fused projections", True, False, False, False, True,
                 False, "sdpa"),
            ]
    if args.only is not None:
        variants = [v for v in variants if any(word in v[0] for word in args.only)]
    for name, fuse, act, norm, gemv, comp, coord, attn in variants:
        ours.unfuse_projections()
        if fuse:
            ours.fuse_projections(fused_activation=act, fused_norm=norm, fused_gemv=gemv)
        torch._dynamo.reset()
        # With coordinate-descent tuning on, inductor rewrites M=1 matmuls as fused mul+sum reductions.
        torch._inductor.config.coordinate_descent_tuning = coord
        try:
            t0 = time.perf_counter()
            dec = CUDAGraphDecoder(ours, 1, max_len, compile=comp, attention=attn.removesuffix("+rope"),
                                   fused_rope=attn.endswith("+rope"))  # fmt: skip
            tok_s, e2e = _time_graph(dec, ids, args.new_tokens, args.reps)
            check = dec.generate(ids, 16)
            rows[name] = {"tokens_per_s": tok_s, "end_to_end_tokens_per_s": e2e,
                          "setup_and_warmup_s": time.perf_counter() - t0,
                          "bf16_first16_equal_eager": bool((check == generate(ours, ids, 16, cache="static")).all())}
            if args.profile and comp:
                rows[name]["kernels_per_step"] = profile_step(dec, ids)
            del dec
        except Exception as exc:  # record and go on: one failing variant must not lose the run
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(name, {k: v for k, v in rows[name].items() if k != "kernels_per_step"}, flush=True)
    for row in rows.values():
        if "tokens_per_s" in row:
            bytes_per_tok = weight_bytes + kv_bytes_per_token * max_len
            row["fraction_of_weight_bound"] = row["tokens_per_s"] / results["floor_tokens_per_s"]
            row["achieved_gbs"] = row["tokens_per_s"] * bytes_per_tok / 1e9
    results["rows"] = rows
    best = max((r["tokens_per_s"] for n, r in rows.items() if n.startswith("ours") and "tokens_per_s" in r), default=0)
    results["best_ours_tokens_per_s"] = best
    results["transformers_tokens_per_s"] = rows.get("transformers generate (dynamic cache)", {}).get("tokens_per_s")
    save_json(results, args.out)
    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; "
          f"floor {results['floor_tokens_per_s']:.0f} tokens/s")
    for name, row in rows.items():
        if "tokens_per_s" in row:
            print(f"{name:55s} {row['tokens_per_s']:8.1f} tok/s  {100 * row['fraction_of_weight_bound']:5.1f}% of bound")
        else:
            print(f"{name:55s} {row['error']}")
    return results


if __name__ == "__main__":
    main()
