"""Batch-1 decode of a 1B-parameter Llama-shaped model on a GPU: ours against transformers, one run.

    python -m nexus_lessons.bench gpu_decode --out course/results         # ~4-5 minutes on an H100
    python -m nexus_lessons.bench gpu_decode --smoke --out /tmp/gd        # CPU smoke test: a tiny model, no claims

Random weights (nothing can be downloaded); the shape is Llama-3.2-1B's with a 32k vocabulary and tied
embeddings: 1.04B parameters, 2.08 GB in bf16. Every decode step reads all of them once, so weights /
read bandwidth (a read-only ``sum``, measured in the same run; the datasheet figure beside it) bounds
tokens per second; each row says how close it gets.

Pairs compare like with like, each side warmed at the length it is timed at:

* eager: transformers ``generate`` (dynamic cache; static cache with ``disable_compile=True``) against
  our ``generate(model, ids, n, cache="static")``;
* compiled: transformers ``generate`` with ``cache_implementation="static"``, which transformers compiles
  itself (``CompileConfig``: ``torch.compile(mode="reduce-overhead")``, CUDA graphs included), its
  documented fast path, against our ``CUDAGraphDecoder(compile=True)``, without and with our kernels
  (GEMV projections, paged decode attention, the RoPE/page-write kernel).

Rates are end-to-end ``generate`` calls (prompt included; the median of ``--reps``), and for our graph
decoders also the decode steps alone (CUDA events). Before timing, float32 greedy tokens of every one of
our decoders equal transformers' ``generate``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._inductor.config

from ..cuda_graph import CUDAGraphDecoder
from ..generate import generate
from ..loading import from_hf
from .common import datasheet_gbps, environment, median, read_bandwidth_gbs, save_json

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rms_norm_eps=1e-5)  # fmt: skip
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5)  # fmt: skip
# (row, CUDAGraphDecoder options, GEMV kernels): our graph decoders
OURS_GRAPH = [
    ("ours: CUDA graph", dict(compile=False, attention="sdpa"), False),
    ("ours: compile + CUDA graph", dict(compile=True, attention="sdpa"), False),
    ("ours: compile + CUDA graph + our kernels (GEMV, paged attention, RoPE/page write)",
     dict(compile=True, attention="paged", fused_rope=True), True),
]  # fmt: skip
HEADLINE_EAGER = ("transformers generate, static cache, eager", "ours: generate, static cache, eager")
HEADLINE_COMPILED = ("transformers generate, static cache, compiled", OURS_GRAPH[-1][0])
HEADLINE_COMPILED_NO_KERNELS = ("transformers generate, static cache, compiled", OURS_GRAPH[1][0])


def _hf_model(config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early, on either side
    hf.generation_config.pad_token_id = 0
    return hf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(call: Callable[[], Any], n: int, reps: int, device: torch.device, warm: int = 2) -> float:
    """Tokens per second of ``call`` (which generates n tokens), warmed at that same length."""
    for _ in range(warm):  # compile, capture, autotune: all at the timed length, outside the timed region
        call()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return n / median(times)


def _decode_steps_rate(dec: CUDAGraphDecoder, ids: torch.Tensor, n: int, reps: int) -> float:
    """Decode steps alone (no prompt), CUDA events around ``n - 1`` graph replays; the median of reps."""
    times = []
    for _ in range(reps):
        B = dec.prefill(ids)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dec.decode(B, n - 1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return (n - 1) / median(times)


def check_float32(config: dict, ids: torch.Tensor, device: torch.device, n_check: int, max_len: int) -> dict:
    """Greedy float32 tokens of every one of our decoders against transformers' ``generate``."""
    hf = _hf_model(config, torch.float32, device)
    ref = hf.generate(ids, max_new_tokens=n_check, do_sample=False)
    ours = from_hf(hf).fuse_projections()
    check = {"nocache_equals_transformers": bool((ref == generate(ours, ids, n_check)).all()),
             "static_cache_equals_transformers": bool((ref == generate(ours, ids, n_check, cache="static")).all())}  # fmt: skip
    # The graph decoders' steps (compiled ones run the same ops: they are checked against eager in bf16)
    for name, opts, gemv in (("CUDA graph decoder", dict(attention="sdpa"), False),
                             ("CUDA graph decoder + our kernels", dict(attention="paged", fused_rope=True), True)):  # fmt: skip
        ours.unfuse_projections().fuse_projections(fused_gemv=gemv)
        dec = CUDAGraphDecoder(ours, 1, max_len, **opts)
        check[f"{name} equals transformers"] = bool((ref == dec.generate(ids, n_check)).all())
    return check


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="course/results", help="folder for gpu_decode.json")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens per compiled / graphed generate call")
    ap.add_argument("--eager-new-tokens", type=int, default=32, help="tokens per eager generate call (slow)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, eager rows only: checks the script")
    args = ap.parse_args(argv)
    if args.smoke:
        device, config = torch.device("cpu"), TINY
        args.new_tokens = args.eager_new_tokens = min(args.eager_new_tokens, 8)
        args.reps = 1
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke); the course shows its committed results instead")
    else:
        device, config = torch.device("cuda"), LLAMA_1B
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    env = environment()
    results: dict[str, Any] = {"benchmark": "gpu_decode", **env, "smoke": args.smoke, "config": config,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                               "eager_new_tokens": args.eager_new_tokens, "reps": args.reps}  # fmt: skip
    read_gbps = None if args.smoke else read_bandwidth_gbs()
    results.update(read_gbps=read_gbps, datasheet_gbps=None if args.smoke else datasheet_gbps(env.get("device", "")))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (1, args.prompt_len), generator=g).to(device)
    n_check = 16 if args.smoke else 32
    max_len = args.prompt_len + max(args.new_tokens, n_check)

    # 1. Correctness in float32: every one of our decoders against transformers' greedy generate.
    check = check_float32(config, ids, device, n_check, max_len)
    results["check_float32"] = check
    print("float32 check:", check, flush=True)
    assert all(check.values()), f"our decoders disagree with transformers in float32: {check}"
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. Speed in bf16 (float32 in the smoke run).
    dtype = torch.float32 if args.smoke else torch.bfloat16
    hf = _hf_model(config, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # the tied embedding counted once
    results["weight_bytes"] = weight_bytes
    results["bound_tokens_per_s"] = None if read_gbps is None else read_gbps * 1e9 / weight_bytes
    rows: dict[str, dict] = {}
    results["rows"] = rows
    path = Path(args.out) / "gpu_decode.json"
    ne, nc = args.eager_new_tokens, args.new_tokens

    def hf_call(n: int, **kw) -> Callable[[], Any]:
        return lambda: hf.generate(ids, max_new_tokens=n, do_sample=False, **kw)

    def timed(name: str, call: Callable[[], Any], n: int, warm: int = 1) -> None:
        try:
            rows[name] = {"tokens_per_s": _rate(call, n, args.reps, device, warm), "new_tokens": n}
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the run
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(name, rows[name], flush=True)
        save_json(results, path)  # a time-out still leaves what was measured

    timed("transformers generate, dynamic cache, eager", hf_call(ne), ne)
    timed("transformers generate, static cache, eager", hf_call(ne, cache_implementation="static", disable_compile=True), ne)
    if device.type == "cuda":  # transformers compiles the static-cache decode step itself
        timed("transformers generate, static cache, compiled", hf_call(nc, cache_implementation="static"), nc, warm=2)
    ours = from_hf(hf)
    hf = None  # free transformers' copy of the weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    timed("ours: generate, static cache, eager", lambda: generate(ours, ids, ne, cache="static"), ne)
    bf16_ref = generate(ours, ids, 16, cache="static")
    # Ours only (after transformers ran): inductor writes batch-1 matmuls as fused reductions (measured on
    # the H200: 1069-1083 tokens/s with it, 968 without).
    torch._inductor.config.coordinate_descent_tuning = True
    results["ours_inductor_options"] = {"coordinate_descent_tuning": True}
    for name, opts, gemv in OURS_GRAPH if device.type == "cuda" else []:
        ours.unfuse_projections().fuse_projections(fused_gemv=gemv)
        torch._dynamo.reset()
        try:
            t_setup = time.perf_counter()
            dec = CUDAGraphDecoder(ours, 1, max_len, **opts)
            rows[name] = {"tokens_per_s": _rate(lambda dec=dec: dec.generate(ids, nc), nc, args.reps, device),
                          "new_tokens": nc, "setup_and_warmup_s": round(time.perf_counter() - t_setup, 1)}  # fmt: skip
            rows[name]["decode_steps_tokens_per_s"] = _decode_steps_rate(dec, ids, nc, args.reps)
            rows[name]["bf16_first16_equal_eager"] = bool((dec.generate(ids, 16) == bf16_ref).all())
            del dec
        except Exception as exc:  # noqa: BLE001
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(name, rows[name], flush=True)
        save_json(results, path)
    for row in rows.values():
        if "tokens_per_s" in row and results["bound_tokens_per_s"]:
            row["fraction_of_read_bound"] = row["tokens_per_s"] / results["bound_tokens_per_s"]

    def ratio(pair: tuple[str, str]) -> dict:
        a, b = (rows.get(k, {}).get("tokens_per_s") for k in pair)
        return {"baseline": pair[0], "ours": pair[1], "speedup": None if not (a and b) else b / a}

    results["headline"] = {"eager": ratio(HEADLINE_EAGER), "compiled": ratio(HEADLINE_COMPILED),
                           "compiled_without_our_kernels": ratio(HEADLINE_COMPILED_NO_KERNELS)}  # fmt: skip
    results["elapsed_s"] = round(time.perf_counter() - t0)
    save_json(results, path)
    bound = results["bound_tokens_per_s"]
    print(f"\nread {read_gbps} GB/s; weights {weight_bytes / 1e9:.3f} GB; bound {bound} tokens/s")
    for name, row in rows.items():
        frac = row.get("fraction_of_read_bound")
        print(f"{name:80s} {row.get('tokens_per_s', float('nan')):9.1f} tok/s"
              + (f"  {100 * frac:5.1f}% of bound" if frac else "") + (f"  {row['error']}" if "error" in row else ""))  # fmt: skip
    print(results["headline"])
    print(f"wrote {path} in {results['elapsed_s']} s")
    return results


if __name__ == "__main__":
    main()
