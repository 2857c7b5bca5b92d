"""Time to first token with a prefix cache: a long shared prefix plus a short new suffix, cached vs not;
and the hit rate of a multi-turn chat against the most any cache could serve.

    python -m nexus_lessons.bench prefix_ttft --out course/results         # GPU -> prefix_ttft_gpu.json
    python -m nexus_lessons.bench prefix_ttft --cpu --out course/results   # nexus-tiny on CPU -> prefix_ttft_cpu.json

GPU: a 1.04B-parameter Llama-shaped model with random weights (gpu_decode's shape: hidden 2048, 16 layers,
32 query heads, 8 KV heads, head_dim 128, intermediate 8192, vocab 32000, tied embeddings), bf16, block
size 16. Each timed request is the same 2048-token prefix with a fresh random 64-token suffix; the
cached sides were warmed by one earlier request with the prefix. Without caching the whole 2112-token
prompt goes through the extend kernel; with it, only the suffix. Two ways a user meets it:

* eager: `generate(model, prompt, 1, cache=cache)`, host work included;
* graphed: the host work stays eager (match the prefix, reserve slots, build the metadata), the forward
  replays as one CUDA graph captured for these lengths (`GraphedFirstForward`); `graph_replay_ms` is the
  replay alone, so the rest of `graphed_ms` is host work. `top_kernels`: one request's GPU time per
  kernel (torch.profiler), to tell which part of the forward is short of its floor.

CUDA events, the median of `--reps` requests. The floor for a cached request is reading the weights
once (their bytes over the measured copy bandwidth). Before timing, float32 greedy tokens with each
prefix cache (eager and graphed) are asserted equal to `generate` without a cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from pathlib import Path

import torch

from ..generate import generate
from ..model import Transformer
from ..paged import PagedKVCache
from ..prefix.workloads import hit_rate, multi_turn_chat
from .common import copy_bandwidth_gbs, environment, save_json, top_kernels

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rms_norm_eps=1e-5)
SIDES = ("no prefix cache", "hash", "radix")
# (prefix, suffix, reps, chat: conversations, turns, system, user, reply)
SHAPES = {
    "gpu": dict(prefix=2048, suffix=64, reps=15, chat=(4, 4, 512, 64, 16)),
    "cpu": dict(prefix=1024, suffix=64, reps=5, chat=(2, 3, 128, 32, 12)),
    "smoke": dict(prefix=24, suffix=5, reps=2, chat=(2, 2, 9, 4, 3)),
}


class _PlannedCache:
    """Stands in for a PagedKVCache inside a captured forward: positions and metadata come from fixed
    buffers (filled before each replay), attention from the real cache."""

    fuses_rope = False

    def __init__(self, cache: PagedKVCache, plan, positions: torch.Tensor) -> None:
        self.cache, self.plan, self.positions = cache, plan, positions

    def begin_forward(self, input_ids, attention_mask=None):
        self.cache._plan = self.plan
        return self.positions

    def attend(self, layer, q, k, v):
        return self.cache.attend(layer, q, k, v)


class GraphedFirstForward:
    """A request's first forward (its uncached prompt tokens -> the first token) as one CUDA graph.

    Built from a sample prompt; serves any prompt with the same lengths (cached and new). Per request the
    host matches the prefix, reserves slots and builds the metadata as `generate` does, copies it into the
    graph's buffers, and replays. `use_graph=False` runs the same steps eagerly (how the CPU test checks it).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, prompt: list[int], use_graph: bool) -> None:
        self.model, self.cache, self.use_graph = model, cache, use_graph
        seq, ids, positions = self._plan(prompt)
        plan = cache._plan
        self.lengths = (ids.shape[1], len(prompt))
        self.ids, self.positions = ids.clone(), positions.clone()
        self.plan = dataclasses.replace(plan, slot_mapping=plan.slot_mapping.clone(),
                                        block_tables=plan.block_tables.clone(),
                                        context_lens=plan.context_lens.clone(),
                                        query_start_loc=plan.query_start_loc.clone())
        self.proxy = _PlannedCache(cache, self.plan, self.positions)
        self.graph = None
        if use_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._forward()
        cache.free(seq, prompt)

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        h = self.model.hidden_states(self.ids, cache=self.proxy)
        return self.model.lm_head(h[:, -1]).argmax(-1)

    def _plan(self, prompt):
        seq = self.cache.add_sequence(prompt)
        ids = torch.tensor([prompt[self.cache.num_tokens(seq):]], device=self.cache.device)
        self.cache.bind([seq])
        return seq, ids, self.cache.begin_forward(ids)

    @torch.no_grad()
    def __call__(self, prompt: list[int]) -> tuple[int, int]:
        """(sequence id, first token); the caller frees the sequence."""
        seq, ids, positions = self._plan(prompt)
        if (ids.shape[1], len(prompt)) != self.lengths:
            raise ValueError(f"captured for (new, total) = {self.lengths}, got {(ids.shape[1], len(prompt))}")
        p = self.cache._plan
        for dst, src in ((self.ids, ids), (self.positions, positions), (self.plan.slot_mapping, p.slot_mapping),
                         (self.plan.block_tables, p.block_tables), (self.plan.context_lens, p.context_lens)):
            dst.copy_(src)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self._forward()
        return seq, int(self.out[0])


def random_model(config: dict, device, dtype, seed: int = 0) -> Transformer:
    from ..config import ModelConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(ModelConfig(**config)).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
    return model.to(dtype)


def _now_ms(device) -> callable:
    """A stopwatch: call it to start, call what it returns to read milliseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop():
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return stop
    t0 = time.perf_counter()
    return lambda: (time.perf_counter() - t0) * 1e3


def _caches(model, num_blocks: int, block_size: int) -> dict[str, PagedKVCache]:
    return {side: PagedKVCache.for_model(model, num_blocks, block_size, prefix_cache=None if side == SIDES[0] else side)
            for side in SIDES}


class Suffixes:
    """Fresh random suffixes whose first tokens all differ, so a request shares exactly the prefix with
    every earlier one (and the radix tree's hit is the prefix, not one token more)."""

    def __init__(self, length: int, vocab: int, seed: int) -> None:
        self.rng, self.length, self.vocab = random.Random(seed), length, vocab
        self.firsts = iter(self.rng.sample(range(1, vocab), vocab - 1))

    def __call__(self) -> list[int]:
        return [next(self.firsts)] + [self.rng.randrange(1, self.vocab) for _ in range(self.length - 1)]


def check_exact(model, prefix, fresh, block_size, new_tokens, graphs: bool) -> dict:
    """Greedy tokens with each prefix cache (the second request hits the prefix) equal no cache at all,
    through generate and through `GraphedFirstForward`."""
    suffixes = [fresh() for _ in range(4)]
    want = [generate(model, [prefix + s], new_tokens)[0].tolist() for s in suffixes]
    out = {}
    for side, cache in _caches(model, 8 * -(-len(want[0]) // block_size), block_size).items():
        got = [generate(model, [prefix + s], new_tokens, cache=cache)[0].tolist() for s in suffixes[:2]]
        out[f"{side}: generate equals no cache"] = got == want[:2]
        if side != SIDES[0]:
            out[f"{side}: the second request was served the prefix"] = cache.prefix_hit_tokens == len(prefix)
        fwd = GraphedFirstForward(model, cache, prefix + suffixes[2], use_graph=graphs)
        seq, first = fwd(prefix + suffixes[3])
        cache.free(seq, prefix + suffixes[3])
        out[f"{side}: {'graphed' if graphs else 'planned'} first forward equals no cache"] = (
            first == want[3][len(prefix) + len(suffixes[3])])
    return out


def time_ttft(model, prefix, fresh, reps, block_size, graphs: bool) -> dict:
    """Median time to first token per side, eager (generate) and, with `graphs`, graphed."""
    dev = model.device
    total = len(prefix) + len(fresh())
    caches = _caches(model, (reps + 4) * -(-total // block_size), block_size)
    result: dict = {}
    for cache in caches.values():
        generate(model, [prefix + fresh()], 1, cache=cache)  # warm-up; fills the prefix cache
        generate(model, [prefix + fresh()], 1, cache=cache)
    ms = {side: [] for side in SIDES}
    hits = {side: [] for side in SIDES}
    for _ in range(reps):
        for side, cache in caches.items():  # interleaved, so drift hits every side alike
            prompt = prefix + fresh()
            before = cache.prefix_hit_tokens
            stop = _now_ms(dev)
            generate(model, [prompt], 1, cache=cache)
            ms[side].append(stop())
            hits[side].append(cache.prefix_hit_tokens - before)
    for side in SIDES:
        result[side] = {"eager_ms": statistics.median(ms[side]), "eager_ms_all": ms[side],
                        "prompt_tokens_served_from_cache": statistics.median(hits[side])}
        if dev.type == "cuda":  # device time per kernel of one request (launch gaps aside); a diagnostic
            try:
                result[side]["top_kernels"] = top_kernels(
                    lambda c=caches[side]: generate(model, [prefix + fresh()], 1, cache=c))
            except Exception as exc:
                result[side]["top_kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if graphs:
        fwd = {}
        for side, cache in caches.items():
            try:
                fwd[side] = GraphedFirstForward(model, cache, prefix + fresh(), use_graph=graphs)
            except Exception as exc:  # record and go on: the eager figures must not be lost
                result[side]["graphed_error"] = f"{type(exc).__name__}: {exc}"[:500]
        key = "graphed_ms"
        times = {side: [] for side in fwd}
        for _ in range(reps):
            for side, f in fwd.items():
                prompt = prefix + fresh()
                stop = _now_ms(dev)
                seq, _ = f(prompt)
                times[side].append(stop())
                caches[side].free(seq, prompt)
        for side, t in times.items():
            result[side][key] = statistics.median(t)
            result[side][f"{key}_all"] = t
            # The GPU part alone: the last request's graph replayed again (it rewrites the same K/V into the
            # same, still cached slots). graphed_ms minus this is the host's share.
            replays = []
            for _ in range(reps):
                stop = _now_ms(dev)
                fwd[side].graph.replay()
                replays.append(stop())
            result[side]["graph_replay_ms"] = statistics.median(replays)
    for side in SIDES[1:]:
        for key in ("eager_ms", "graphed_ms"):
            if key in result[side] and key in result[SIDES[0]]:
                result[side][f"speedup_{key.removesuffix('_ms')}"] = result[SIDES[0]][key] / result[side][key]
    return result


def chat_hit_rates(model, block_size, vocab, chat, seed: int = 2) -> dict:
    conversations, turns, system, user, reply = chat
    out = {"conversations": conversations, "turns": turns, "system_len": system, "user_len": user,
           "reply_len": reply}
    for design in SIDES[1:]:
        need = conversations * turns * -(-(system + turns * (user + reply)) // block_size)
        cache = PagedKVCache.for_model(model, need, block_size, prefix_cache=design)
        records, _ = multi_turn_chat(model, cache, conversations=conversations, turns=turns, system_len=system,
                                     user_len=user, reply_len=reply, vocab=vocab, seed=seed)
        ideal = f"ideal_{design}"
        out[design] = {"hit_rate": hit_rate(records), "ideal_hit_rate": hit_rate(records, ideal),
                       "equals_ideal": all(r.hit == getattr(r, ideal) for r in records),
                       "turns": [dataclasses.asdict(r) for r in records]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="course/results", help="folder for prefix_ttft_{gpu,cpu,smoke}.json")
    ap.add_argument("--cpu", action="store_true", help="nexus-tiny on the CPU (the notebook's live figures)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, tiny shapes: checks the script runs")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("prefix_ttft needs a CUDA GPU (or --cpu / --smoke); the course shows its committed results")
    shape = dict(SHAPES[mode])
    reps = args.reps or shape["reps"]
    block_size = 16 if mode != "smoke" else 4
    if mode != "gpu":
        torch.set_num_threads(1)  # small models gain little from threads; the figures stay steadier
    t_start = time.perf_counter()
    results: dict = {"benchmark": "prefix_ttft", "mode": mode, **environment(), "block_size": block_size,
                     "prefix_len": shape["prefix"], "suffix_len": shape["suffix"], "reps": reps}
    if mode == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        config, device = LLAMA_1B, torch.device("cuda")
        model = random_model(config, device, torch.float32)
        results["model"] = {"shape": config, "parameters": sum(p.numel() for p in model.parameters()),
                            "weights": "random, normal(0, 0.02)"}
    elif mode == "cpu":
        from ..loading import load_model

        model, _ = load_model("nexus-tiny")
        config, device = {k: getattr(model.config, k) for k in LLAMA_1B}, torch.device("cpu")
        results["model"] = {"name": "nexus-tiny", "parameters": sum(p.numel() for p in model.parameters())}
    else:
        config = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        device = torch.device("cpu")
        model = random_model(config, device, torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(10)  # peaked logits: std 0.2
    vocab = config["vocab_size"]
    rng = random.Random(0)
    prefix = [rng.randrange(1, vocab) for _ in range(shape["prefix"])]
    fresh = Suffixes(shape["suffix"], vocab, seed=1)
    graphs = device.type == "cuda"

    check = check_exact(model, prefix, fresh, block_size, 8 if mode != "smoke" else 4, graphs)
    results["check_float32"] = check
    print("float32 check:", check, flush=True)
    assert all(check.values()), f"prefix caching changed the greedy tokens: {check}"

    if mode == "gpu":
        model = model.to(torch.bfloat16)
        torch.cuda.empty_cache()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        copy_gbs = copy_bandwidth_gbs()
        results.update(dtype="bfloat16", weight_bytes=weight_bytes, copy_bandwidth_gbs=copy_gbs,
                       cached_floor_ms=weight_bytes / (copy_gbs * 1e9) * 1e3)
    else:
        results["dtype"] = "float32"
    results["ttft"] = time_ttft(model, prefix, fresh, reps, block_size, graphs)
    results["chat"] = chat_hit_rates(model, block_size, vocab, shape["chat"])
    for design in SIDES[1:]:
        assert results["chat"][design]["equals_ideal"], f"{design}: chat hits below the ideal"
    results["elapsed_s"] = time.perf_counter() - t_start
    path = save_json(results, Path(args.out) / f"prefix_ttft_{mode}.json")

    print(f"\n{results.get('device')}: {shape['prefix']}-token shared prefix + {shape['suffix']}-token suffix, "
          f"time to first token (median of {reps})")
    for side, row in results["ttft"].items():
        cols = [f"{k.removesuffix('_ms')} {row[k]:8.2f} ms" for k in ("eager_ms", "graphed_ms", "graph_replay_ms")
                if k in row]
        gains = [f"{k.removeprefix('speedup_')} x{v:.1f}" for k, v in row.items() if k.startswith("speedup_")]
        print(f"  {side:<16} {'  '.join(cols)}  {'  '.join(gains)}")
    if "cached_floor_ms" in results:
        print(f"  floor for a cached request (weights once at {results['copy_bandwidth_gbs']:.0f} GB/s): "
              f"{results['cached_floor_ms']:.2f} ms")
    for design in SIDES[1:]:
        c = results["chat"][design]
        print(f"  chat hit rate, {design}: {c['hit_rate']:.3f} (ideal {c['ideal_hit_rate']:.3f})")
    print(f"wrote {path} in {results['elapsed_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
