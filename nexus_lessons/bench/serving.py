"""Serving throughput of the engine (lesson 10) on a 1B-parameter Llama-shaped model, one run, one GPU.

    python -m nexus_lessons.bench serving --out course/results/serving_gpu.json     # about 6 minutes
    python -m nexus_lessons.bench serving --smoke --out /tmp/serving_smoke.json      # CPU, seconds

The model has random weights (nothing can be downloaded): Llama-3.2-1B's shape with a 32k vocabulary and
tied embeddings (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192): 1.04B parameters,
2.08 GB in bf16. Random weights never say "stop", so every request runs to its length (ignore_eos).

Sections (`--sections`, default all), each recorded even when another fails:
* check: float32 greedy tokens of the engine (CUDA graphs, chunked prefill, preemption in a small pool)
  equal plain `generate` with no cache, on a small Llama with peaked logits. Asserted before any timing.
* transformers / throughput: 256 requests, prompts of 100-1024 tokens, 512 new tokens each; output
  tokens/s of transformers' continuous batching (`generate_batch`) and of our engine on the same requests,
  and the workload's memory-bandwidth bound: every decode step reads the weights and the K/V of every
  live request's context, at the read bandwidth of a large `torch.sum` measured in this run. Then the GPU
  time per kernel of one prefill step and one decode step of the same requests (torch.profiler).
* variable: the same prompts with 100-1024 new tokens each (ours only: `generate_batch` takes one length).
* static: continuous batching against static (request-level) batching of the same engine, 64 seats,
  512 requests whose output lengths are long-tailed (95% 16-128 tokens, 5% 768-1024); and continuous
  batching that admits each request as soon as a seat frees (the scheduler's deferred admission off).
* batch1: one request decoding 512 tokens through the engine, against the weight-read bound.
* ablation: each feature's contribution, every row in this run beside the engine's own row: CUDA graphs
  off (`enforce_eager`), a smaller prefill-chunk budget, quantized KV (int8 with CUDA graphs, int4 eager)
  and speculative n-gram decoding (k = 4) on the same 64 requests (128 new tokens each); prefix caching
  on a workload whose prompts share a 512-token prefix (a system prompt a warm-up request has already
  left in the cache), against the engine without it (TTFT and hit rate).
Throughputs are wall-clock times of whole runs after a warm-up run of the same requests (the shared-prefix
rows warm up on requests of the same lengths that share only the prefix); each row lists the Triton kernels compiled inside the timed run (there
should be none), its steps and CUDA-graph steps, and its host and device-wait seconds (an engine that
never waits for the device is host-bound). TTFT and TPOT percentiles come with each.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import numpy as np
import torch

from ..engine import LLM, SamplingParams
from ..engine.metrics import summarize
from ..generate import generate
from ..loading import from_hf
from .common import count_compiles, environment, save_json, top_kernels
from .gpu_decode import LLAMA_1B

RUN_STATS = ("steps", "graph_steps", "spec_steps", "host_s", "wait_s")  # engine counters reported per timed run
SECTIONS = ("check", "transformers", "throughput", "variable", "static", "batch1", "ablation")
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def read_bandwidth_gbs(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """Bytes read per second by a large `torch.sum` (a read-only kernel), median of `reps`."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    for _ in range(3):
        x.sum()
    times = []
    for _ in range(reps):
        t = _Timer(device)
        x.sum()
        times.append(t.stop())
    return x.nbytes / float(np.median(times)) / 1e9


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            return self.a.elapsed_time(self.b) / 1e3
        return time.perf_counter() - self.t0


def hf_model(config: dict, dtype: torch.dtype, device: torch.device, init: float = 0.02, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**config, initializer_range=init)).to(dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int] | None, vocab: int, seed: int):
    """(prompts, output lengths): random token ids, uniform lengths, a fixed seed."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, rng.integers(prompt_range[0], prompt_range[1] + 1)).tolist() for _ in range(n)]
    outputs = [int(x) for x in rng.integers(output_range[0], output_range[1] + 1, n)] if output_range else None
    return prompts, outputs


def long_tailed_outputs(n: int, seed: int, short=(16, 128), long=(768, 1024), long_share=0.05) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(n) < long_share, rng.integers(long[0], long[1] + 1, n),
                       rng.integers(short[0], short[1] + 1, n))
    return [int(x) for x in lengths]


def bandwidth_bound(prompt_lens, output_lens, weight_bytes: int, kv_bytes_per_token: int, gbs: float) -> float:
    """Output tokens/s if every decode step took only its reads at `gbs`: the weights once, plus the K/V of
    each live request's context. All requests start together; prefill is free (so this bound is generous)."""
    p, n = np.asarray(prompt_lens, dtype=np.float64), np.asarray(output_lens, dtype=np.float64)
    seconds = 0.0
    for s in range(1, int(n.max())):  # decode step s makes output token s + 1 of each request with n > s
        live = n > s
        seconds += (weight_bytes + kv_bytes_per_token * float((p[live] + s).sum())) / (gbs * 1e9)
    return float(n.sum()) / seconds


def run_engine(llm: LLM, prompts, lengths, **params) -> dict:
    """One timed run through `LLM.generate`: its metrics, the engine's step counters over the run (steps,
    CUDA-graph steps, host and device-wait seconds) and the Triton kernels compiled during it (none, when
    the warm-up covered every shape)."""
    sps = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n, **params) for n in lengths]
    stats0 = dict(llm.engine.stats)
    with count_compiles() as compiled:
        outs = llm.generate(prompts, sps, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == list(lengths)
    m = dict(llm.last_metrics)
    for key in RUN_STATS:
        m[key] = llm.engine.stats[key] - stats0[key]
    m["compiles_in_run"] = compiled
    return m


def step_kernels(llm: LLM, prompts, new_tokens: int = 32) -> dict:
    """GPU time per kernel of one prefill step (the first, eager) and one decode step (a graph replay, once
    every request decodes), for the requests given; then runs them to the end."""
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=new_tokens))
    out = {"prefill_step": top_kernels(engine.step)}  # with the overlap: the kernels of the step it launches
    while engine.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    engine.step()
    out["decode_step"] = top_kernels(engine.step)
    while engine.has_unfinished_requests():
        engine.step()
    return out


def warm_then_time(llm: LLM, prompts, lengths) -> dict:
    """The run timed the second time: the first, identical, compiles every kernel variant it meets."""
    warm = run_engine(llm, prompts, lengths)
    compiled = warm["compiles_in_run"]
    return run_engine(llm, prompts, lengths) | {"compiles_in_warmup": None if compiled is None else len(compiled)}


def run_static(llm: LLM, prompts, lengths, seats: int) -> dict:
    """Request-level batching through the same engine: `seats` requests run until all are done, then the next."""
    engine = llm.engine
    stats0 = dict(engine.stats)
    t0 = time.perf_counter()
    seqs = []
    with count_compiles() as compiled:
        for i in range(0, len(prompts), seats):
            for p, n in zip(prompts[i:i + seats], lengths[i:i + seats]):
                engine.add_request(p, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n))
            while engine.has_unfinished_requests():
                seqs += [o.sequence for o in engine.step() if o.finished]
    wall = time.perf_counter() - t0
    return summarize(seqs, wall) | {key: engine.stats[key] - stats0[key] for key in RUN_STATS} | {
        "compiles_in_run": compiled}


def section_check(device: torch.device, smoke: bool) -> dict:
    """float32: engine == plain generate, with graphs, chunks mixed with decodes, and preemption."""
    config = dict(SMOKE) if smoke else dict(vocab_size=4096, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                            max_position_embeddings=1024, tie_word_embeddings=False)
    model = from_hf(hf_model(config, torch.float32, device, init=0.2, seed=1))
    prompts, lengths = workload(12, (1, 300 if not smoke else 40), (1, 40), config["vocab_size"], seed=2)
    llm = LLM(model, num_kv_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=96)
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for n in lengths],
                        use_tqdm=False)
    equal = [o.token_ids == generate(model, torch.tensor([p], device=device), n)[0, len(p):].tolist()
             for p, n, o in zip(prompts, lengths, outs)]
    stats = llm.engine.stats
    result = {"requests": len(prompts), "equal": equal, "all_equal": all(equal), "steps": stats["steps"],
              "graph_steps": stats["graph_steps"], "preemptions": llm.engine.scheduler.num_preemptions}
    del llm
    if device.type == "cuda":  # the pool sized from free memory (no num_kv_blocks)
        auto = LLM(model, max_num_seqs=4, max_num_batched_tokens=512)
        result["auto_num_kv_blocks"] = auto.engine.cache.num_blocks
        result["auto_kv_gib"] = auto.engine.cache.nbytes / 2**30
        out = auto.generate(prompts[:2], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8), use_tqdm=False)
        result["auto_equal"] = all(o.token_ids == generate(model, torch.tensor([p], device=device), 8)[0, len(p):].tolist()
                                   for p, o in zip(prompts[:2], out))
        del auto
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="course/results/serving_gpu.json")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script, times nothing real")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke); the course shows its committed results")
    device = torch.device("cpu" if smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    shape = SMOKE if smoke else LLAMA_1B
    # Sizes: the real run, or a small copy of every section for the CPU.
    N, prompt_range, new_tokens = (8, (4, 40), 8) if smoke else (256, (100, 1024), 512)
    out_range = (4, 16) if smoke else (100, 1024)
    seats, tail_requests = (4, 16) if smoke else (64, 512)
    tail_prompts = (4, 24) if smoke else (32, 256)
    tail_kw = dict(short=(2, 6), long=(24, 32), long_share=0.2) if smoke else {}
    b1_prompt, b1_tokens = (8, 16) if smoke else (128, 512)
    shared_len, own_range = (16, (2, 8)) if smoke else (512, (16, 128))  # the prefix-caching workload
    results: dict = {"benchmark": "serving", **environment(), "smoke": smoke, "config": shape, "sections": {}}
    sec = results["sections"]

    def record(name, fn):
        if name not in args.sections:
            return None
        print(f"--- {name}", flush=True)
        t0 = time.perf_counter()
        try:
            sec[name] = fn()
        except Exception as exc:  # record and go on: one failing section must not lose the run
            sec[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000], "traceback": traceback.format_exc()[-3000:]}
        sec[name]["section_s"] = time.perf_counter() - t0
        print({k: v for k, v in sec[name].items() if k != "traceback"}, flush=True)
        save_json(results, args.out)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return sec[name]

    gbs = read_bandwidth_gbs(device, (64 << 20) if smoke else (4 << 30))
    results["read_bandwidth_gbs"] = gbs
    check = record("check", lambda: section_check(device, smoke))
    if check is not None and not check.get("all_equal"):
        save_json(results, args.out)
        raise AssertionError(f"the engine's float32 greedy tokens differ from generate: {check}")

    dtype = torch.float32 if smoke else torch.bfloat16
    hf = hf_model(shape, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # the tied embedding once
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * dtype.itemsize
    results.update(weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token,
                   batch1_bound_tokens_per_s=gbs * 1e9 / weight_bytes)
    prompts, _ = workload(N, prompt_range, None, shape["vocab_size"], seed=10)
    fixed = [new_tokens] * N
    _, variable = workload(N, (1, 1), out_range, shape["vocab_size"], seed=11)
    results["workload"] = {"requests": N, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                           "new_tokens": new_tokens, "variable_new_tokens": out_range,
                           "prompt_lens": [len(p) for p in prompts], "variable_lens": variable}
    results["bound_tokens_per_s"] = bandwidth_bound([len(p) for p in prompts], fixed, weight_bytes, kv_per_token, gbs)
    results["variable_bound_tokens_per_s"] = bandwidth_bound([len(p) for p in prompts], variable, weight_bytes,
                                                             kv_per_token, gbs)

    def transformers_section() -> dict:
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=256) if smoke else None

        def call(n):
            gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return hf.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                     progress_bar=False, warmup=not smoke)

        call(16)  # warm-up: kernels, allocator, graphs
        t = _Timer(device)
        outs = call(new_tokens)
        wall = t.stop()
        tokens = sum(len(o.generated_tokens) for o in outs.values())
        spans = [getattr(o, "lifespan", (-1, -1)) for o in outs.values()]
        row = {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall}
        if all(a >= 0 and b >= 0 for a, b in spans):  # from the first request leaving the queue to the last done
            span = max(b for _, b in spans) - min(a for a, _ in spans)
            row.update(span_s=span, span_output_tokens_per_s=tokens / span)
        assert tokens == N * new_tokens, f"generate_batch returned {tokens} tokens, expected {N * new_tokens}"
        return row

    record("transformers", transformers_section)
    ours = from_hf(hf)
    hf = None  # free its weights before the engine sizes its pool
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    max_len = prompt_range[1] + max(new_tokens, out_range[1])
    blocks = N * -(-max_len // 16) + 64  # room for every request at once: no preemption in the timed runs
    options = dict(max_num_seqs=N, max_model_len=max_len, num_kv_blocks=blocks, max_num_batched_tokens=8192)
    llm = None

    def engine() -> LLM:
        nonlocal llm
        if llm is None:
            t = time.perf_counter()
            llm = LLM(ours, **options)
            results["engine_setup_s"] = time.perf_counter() - t
        return llm

    def throughput_section() -> dict:
        m = warm_then_time(engine(), prompts, fixed)
        if device.type == "cuda":
            try:  # a diagnostic: its failure must not lose the figures above
                m["top_kernels"] = step_kernels(engine(), prompts)
            except Exception as exc:
                m["top_kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        m["fraction_of_bound"] = m["output_tokens_per_s"] / results["bound_tokens_per_s"]
        hf_row = sec.get("transformers", {})
        best_hf = max(hf_row.get("output_tokens_per_s", 0), hf_row.get("span_output_tokens_per_s", 0))
        if best_hf:
            m["speedup_vs_transformers"] = m["output_tokens_per_s"] / best_hf
        return m

    def variable_section() -> dict:
        m = warm_then_time(engine(), prompts, variable)
        m["fraction_of_bound"] = m["output_tokens_per_s"] / results["variable_bound_tokens_per_s"]
        return m

    def batch1_section() -> dict:
        llm = engine()
        prompt = workload(1, (b1_prompt, b1_prompt), None, shape["vocab_size"], seed=12)[0]
        runs = [run_engine(llm, prompt, [b1_tokens]) for _ in range(3)]
        tpot = float(np.median([r["tpot_s"]["p50"] for r in runs]))
        return {"prompt_tokens": b1_prompt, "new_tokens": b1_tokens, "decode_tokens_per_s": 1 / tpot,
                "end_to_end_tokens_per_s": float(np.median([r["output_tokens_per_s"] for r in runs])),
                "fraction_of_weight_bound": (1 / tpot) / results["batch1_bound_tokens_per_s"], "runs": runs}

    record("throughput", throughput_section)
    record("variable", variable_section)
    record("batch1", batch1_section)

    def ablation_section() -> dict:
        nonlocal llm
        llm = None  # drop the first engine (its graphs and pool) before building others
        gc.collect()
        quarter, n_new = prompts[: N // 4], [new_tokens // 4] * (N // 4)
        rng = np.random.default_rng(15)
        shared = rng.integers(0, shape["vocab_size"], shared_len).tolist()
        with_prefix = [shared + rng.integers(0, shape["vocab_size"], rng.integers(*own_range)).tolist()
                       for _ in quarter]
        base = options | {"max_num_seqs": len(quarter), "num_kv_blocks": blocks // 4 + 64}
        # Warm-up: the timed requests themselves (every prefill chunk and decode shape of the run); for the
        # shared-prefix rows, other requests of the same lengths that share only the prefix (they leave it
        # cached, nothing more).
        warm_prefix = [shared + rng.integers(0, shape["vocab_size"], len(p) - shared_len).tolist() for p in with_prefix]
        rows = {}
        spec = {"method": "ngram", "num_speculative_tokens": 4}
        for name, extra, batch, warm_up in [
                ("engine", {}, quarter, quarter),
                ("CUDA graphs off (enforce_eager)", {"enforce_eager": True}, quarter, quarter),
                ("prefill chunks of 2048 tokens", {"max_num_batched_tokens": 2048}, quarter, quarter),
                ("quantized KV int8", {"kv_cache_dtype": "int8"}, quarter, quarter),
                ("quantized KV int4 (eager)", {"kv_cache_dtype": "int4"}, quarter, quarter),
                ("speculative n-gram, k = 4", {"speculative": spec}, quarter, quarter),
                ("shared-prefix workload: engine", {}, with_prefix, warm_prefix),
                ("shared-prefix workload: prefix caching", {"enable_prefix_caching": True}, with_prefix, warm_prefix)]:
            try:
                e = LLM(ours, **(base | extra))
                run_engine(e, warm_up, n_new)
                rows[name] = run_engine(e, batch, n_new)
                stats = e.engine.stats
                if stats["spec_proposed"]:
                    rows[name]["acceptance_rate"] = stats["spec_accepted"] / stats["spec_proposed"]
            except Exception as exc:
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            e = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return {"requests": len(quarter), "new_tokens": n_new[0], "shared_prefix_tokens": shared_len, "rows": rows}

    record("ablation", ablation_section)

    def static_section() -> dict:
        nonlocal llm
        llm = None
        gc.collect()
        t_prompts, _ = workload(tail_requests, tail_prompts, None, shape["vocab_size"], seed=13)
        lengths = long_tailed_outputs(tail_requests, seed=14, **tail_kw)
        tail_len = tail_prompts[1] + max(lengths)
        e = LLM(ours, max_num_seqs=seats, max_model_len=tail_len, num_kv_blocks=seats * -(-tail_len // 16) + 16)
        cont = warm_then_time(e, t_prompts, lengths)
        static = run_static(e, t_prompts, lengths, seats)
        deferred = e.engine.scheduler.defer_admission
        e.engine.scheduler.defer_admission = False  # the scheduler's deferred admission, measured against none
        at_once = run_engine(e, t_prompts, lengths)
        e.engine.scheduler.defer_admission = deferred
        return {"requests": tail_requests, "seats": seats, "output_lens": lengths, "continuous": cont,
                "static": static, "speedup": cont["output_tokens_per_s"] / static["output_tokens_per_s"],
                "admission_deferred": deferred, "continuous_admitting_at_once": at_once}

    record("static", static_section)
    save_json(results, args.out)
    print(summary(results))
    return results


def summary(r: dict) -> str:
    s = r["sections"]
    lines = [f"read bandwidth {r['read_bandwidth_gbs']:.0f} GB/s; bound {r.get('bound_tokens_per_s', 0):.0f} tok/s "
             f"(fixed outputs), {r.get('variable_bound_tokens_per_s', 0):.0f} (variable)"]
    for name in ("transformers", "throughput", "variable"):
        row = s.get(name, {})
        if "output_tokens_per_s" in row:
            extra = {k: round(row[k], 3) for k in ("fraction_of_bound", "speedup_vs_transformers",
                                                   "span_output_tokens_per_s") if k in row}
            lines.append(f"{name:12s} {row['output_tokens_per_s']:9.0f} tok/s  {extra}")
    if "decode_tokens_per_s" in s.get("batch1", {}):
        b = s["batch1"]
        lines.append(f"batch 1      {b['decode_tokens_per_s']:9.0f} tok/s  {b['fraction_of_weight_bound']:.1%} of weight bound")
    if "speedup" in s.get("static", {}):
        st = s["static"]
        at_once = st["continuous_admitting_at_once"]["output_tokens_per_s"] / st["static"]["output_tokens_per_s"]
        lines.append(f"continuous / static batching: {st['speedup']:.2f}x (admitting at once: {at_once:.2f}x)")
    for name, row in s.items():
        if "error" in row:
            lines.append(f"{name}: {row['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
