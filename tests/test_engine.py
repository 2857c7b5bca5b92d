"""The serving engine (lesson 10): exact, leak-free, and it keeps going when requests misbehave.

The exactness invariant: with temperature 0 in float32, every request's tokens equal plain `generate`
with no cache, whatever else the engine does around it: preemption by recompute in a pool too small for
the batch, prefill chunks mixed with decodes under a tiny token budget, mixed prompt and output lengths.
The soak test drives >= 1000 requests with random lengths, arrival times and aborts through the streaming
API and checks the pool after every step.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_model

from nexus_lessons import generate, load_model
from nexus_lessons.engine import LLM, LLMEngine, SamplingParams
from nexus_lessons.engine.sampler import sample, uniform_noise
from nexus_lessons.sampling import logits_to_probs

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(family: str, tie: bool):
    from nexus_lessons import from_hf

    return from_hf(hf_model(family, tie=tie, vocab=97, hidden=32, inter=64, heads=4, kv_heads=2))


def run(engine: LLMEngine, requests, *, check=True) -> tuple[dict[int, list[int]], list]:
    """Add (prompt, params) pairs, step to the end checking the pool each step; outputs by request id."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    outs: dict[int, list[int]] = {i: [] for i in ids}
    batches = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
        batches.append(engine.last_batch)
        if check:
            engine.check_consistent()
    return [outs[i] for i in ids], batches


def reference(model, prompt: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


def mixed_requests(seed: int, count: int, vocab: int, max_prompt: int = 23, max_new: int = 17):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))],
             SamplingParams(max_tokens=rng.randint(1, max_new), **GREEDY)) for _ in range(count)]


SCENARIOS = {
    # 10 blocks of 4 tokens for 8 sequences of up to 40 tokens: running sequences must be preempted
    "tiny-pool-preempts": dict(num_kv_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=64),
    # 5 tokens per step: prompts are cut into chunks that share steps with the decodes
    "chunked-prefill": dict(num_kv_blocks=64, block_size=5, max_num_seqs=6, max_num_batched_tokens=5),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False)])
def test_greedy_equals_generate(family, tie, scenario):
    model = random_model(family, tie)
    engine = LLMEngine(model, **SCENARIOS[scenario])
    requests = mixed_requests(7, 12, model.config.vocab_size)
    got, batches = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        assert tokens == reference(model, prompt, sp.max_tokens), f"prompt of {len(prompt)}"
    if scenario == "tiny-pool-preempts":
        assert engine.scheduler.num_preemptions > 0
    else:  # some step ran a prompt chunk beside decodes, and some prompt took several steps
        assert any(0 < b.num_decode < len(b) for b in batches)
        assert any(n < len(s.prompt_token_ids) and n > 1 for b in batches for s, n in zip(b.seqs, b.num_new))
    assert engine.cache.num_used_blocks == 0


def test_a_packed_step_may_hold_more_tokens_than_one_sequence_may_reach():
    """Chunked prefill packs many prompts into one row; only each sequence's positions meet the model's limit."""
    model = random_model("llama", True)
    model.config.max_position_embeddings = 48
    engine = LLMEngine(model, num_kv_blocks=64, block_size=8, max_num_seqs=12, max_num_batched_tokens=160)
    requests = mixed_requests(3, 12, model.config.vocab_size)  # prompt + output <= 40 tokens each
    got, batches = run(engine, requests)
    assert max(sum(b.num_new) for b in batches) > 48
    for (prompt, sp), tokens in zip(requests, got):
        assert tokens == reference(model, prompt, sp.max_tokens)


def test_with_cuda_graphs_waiting_requests_are_admitted_together_and_outputs_stay_exact():
    """Deferred admission (on when decode steps replay graphs): outputs still equal generate; on a
    long-tailed workload far fewer steps hold a prefill chunk (eager on a GPU) for few more steps in all;
    and the rule itself, seat by seat and step by step."""
    from nexus_lessons.bench.serving import long_tailed_outputs
    from nexus_lessons.engine.scheduler import MAX_DEFER_STEPS, Scheduler
    from nexus_lessons.engine.sequence import Sequence, Status
    from nexus_lessons.paged import PagedKVCache

    model = random_model("llama", True)
    requests = mixed_requests(11, 40, model.config.vocab_size, max_prompt=9, max_new=30)
    engine = LLMEngine(model, num_kv_blocks=200, block_size=4, max_num_seqs=16, max_num_batched_tokens=256)
    engine.scheduler.defer_admission = True
    got, _ = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        assert tokens == reference(model, prompt, sp.max_tokens)

    def simulate(defer: bool) -> tuple[int, int]:  # the scheduler alone: every sampled token arrives at once
        rng = random.Random(3)
        lengths = long_tailed_outputs(256, seed=4)
        cache = PagedKVCache(1, 1, 4, block_size=16, num_blocks=64 * 80)
        sched = Scheduler(cache, max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=1280)
        sched.defer_admission = defer
        for i, n in enumerate(lengths):  # all queued at once, as in the benchmark
            sched.add(Sequence(i, [1] * rng.randint(32, 256), SamplingParams(max_tokens=n), seed=0))
        steps = eager = 0
        while sched.has_unfinished():
            batch = sched.schedule()
            steps, eager = steps + 1, eager + any(n > 1 for n in batch.num_new)
            for seq, sampled in zip(batch.seqs, batch.samples):
                seq.token_ids += [7] * sampled
                if sampled and len(seq.token_ids) >= seq.max_num_tokens:
                    sched.finish(seq, "length")
        return steps, eager

    (steps, eager), (steps_d, eager_d) = simulate(False), simulate(True)
    assert eager_d < eager / 3 and steps_d < 1.1 * steps, (steps, eager, steps_d, eager_d)

    # The rule: with 2 of 16 seats free a request joins at once; with 1 it waits MAX_DEFER_STEPS steps.
    for decoding, admitted_at in ((14, 1), (15, MAX_DEFER_STEPS + 1)):
        cache = PagedKVCache(1, 1, 4, block_size=4, num_blocks=100)
        sched = Scheduler(cache, max_num_seqs=16, max_num_batched_tokens=100, max_model_len=100)
        sched.defer_admission = True
        for rid in range(decoding):
            seq = Sequence(rid, [1, 2], SamplingParams(max_tokens=50), seed=0)
            sched.add(seq)
            sched.waiting.remove(seq)
            seq.status, seq.cache_seq, seq.num_computed = Status.RUNNING, cache.add_sequence(), 1
            cache.append_slots(seq.cache_seq, 1)
            sched.running.append(seq)
        sched.add(Sequence(99, [3, 4, 5], SamplingParams(max_tokens=5), seed=0))
        for step in range(1, 2 * MAX_DEFER_STEPS):
            batch = sched.schedule()
            for s in batch.seqs:
                s.token_ids.append(7)  # every row gets its token at once: the others keep decoding
            if any(s.request_id == 99 for s in batch.seqs):
                break
        assert step == admitted_at, (decoding, step)


def test_nexus_tiny_greedy_equals_generate_with_text_prompts():
    llm = LLM("nexus-tiny", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=16, block_size=8)
    prompts = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):", "x = ["]
    lengths = [9, 23, 4, 15]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths], use_tqdm=False)
    model, tok = llm.engine.model, llm.tokenizer
    for p, n, o in zip(prompts, lengths, outs):
        assert o.token_ids == reference(model, tok.encode(p), n)
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True) and o.finish_reason == "length"
    assert [o.prompt_token_ids for o in outs] == [tok.encode(p) for p in prompts]  # prompt order
    m = llm.last_metrics
    assert m["output_tokens"] == sum(lengths) and m["ttft_s"]["p50"] > 0 and m["tpot_s"]["p50"] > 0


def test_stop_tokens_and_eos_end_a_request_like_generate():
    model = random_model("llama", True)
    prompt = [5, 17, 3, 44, 9]
    full = reference(model, prompt, 12)
    stop = full[6]
    engine = LLMEngine(model, num_kv_blocks=32, block_size=4)
    (out,), _ = run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]))])
    assert out == full[:full.index(stop) + 1]
    eos = model.config.eos_token_id  # 2: stops unless ignore_eos
    want = generate(model, torch.tensor([prompt]), 12, eos_token_id=eos)[0, len(prompt):].tolist()
    (out,), _ = run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=0))])
    assert out == (want[:want.index(eos) + 1] if eos in want else want)


def test_sampler_matches_the_target_distribution():
    """One batched call: 6000 rows of the same logits, each its own seed; frequencies vs logits_to_probs."""
    torch.manual_seed(0)
    V, S = 11, 6000
    logits = torch.randn(V) * 2
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.9, 6, 0.7)]:
        want = logits_to_probs(logits[None], temperature, top_k, top_p)[0]
        got = sample(logits.expand(S, V).contiguous(), torch.full((S,), temperature),
                     torch.full((S,), top_k or V), torch.full((S,), top_p or 1.0), torch.arange(S) * 7919 + 3,
                     torch.full((S,), 4), all_greedy=False, any_top_k_or_p=bool(top_k or top_p))
        freq = torch.bincount(got, minlength=V).float() / S
        assert (freq - want).abs().sum() / 2 < 0.03, (temperature, top_k, top_p)
        assert bool((freq[want == 0] == 0).all())  # cut tokens are never drawn
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 50000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_seeded_requests_reproduce_whatever_runs_beside_them():
    model = random_model("qwen2", False)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    (alone,), _ = run(LLMEngine(model, num_kv_blocks=40, block_size=4), [(prompt, params)])
    crowd = mixed_requests(3, 6, model.config.vocab_size)
    crowd = [(p, SamplingParams(temperature=0.8, max_tokens=sp.max_tokens)) for p, sp in crowd]
    engine = LLMEngine(model, num_kv_blocks=12, block_size=4, max_num_batched_tokens=6)  # chunks, preemption
    got, _ = run(engine, crowd[:3] + [(prompt, params)] + crowd[3:])
    assert got[3] == alone and len(set(map(tuple, got))) > 1


def test_priority_policy_runs_urgent_requests_first():
    model = random_model("llama", True)
    engine = LLMEngine(model, num_kv_blocks=32, block_size=4, max_num_seqs=1, scheduling_policy="priority")
    sp = SamplingParams(max_tokens=3, **GREEDY)
    engine.add_request([1, 2, 3], sp, priority=5)
    engine.step()  # request 0 runs
    for pr in [1, 3, 0]:
        engine.add_request([1, 2, 3], sp, priority=pr)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == [0, 3, 1, 2]  # request 0 keeps its seat; then lowest value first: priorities 0, 1, 3


def test_bad_input_is_named_before_anything_runs():
    model = random_model("llama", True)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLMEngine(model, max_num_seq=4)
    with pytest.raises(ValueError, match="unknown model"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLMEngine(model, enable_prefix_caching="lru")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(model, kv_cache_dtype="int2")
    with pytest.raises(ValueError, match="unknown speculative option"):
        LLMEngine(model, speculative={"method": "ngram", "k": 3})
    with pytest.raises(ValueError, match="needs a 'model'"):
        LLMEngine(model, speculative={"method": "draft", "num_speculative_tokens": 3})
    engine = LLMEngine(model, num_kv_blocks=8, block_size=4, max_model_len=64)
    good = engine.add_request([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
    for prompt, sp, match in [([], None, "empty prompt"), ([1] * 64, None, "max_model_len"),
                              ([1] * 20, SamplingParams(max_tokens=20), "pool holds 32"),
                              ([1, 500], None, r"in \[0, 97\)"), ("text", None, "tokenizer")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, sp)
    llm = LLM(model, num_kv_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="pool holds"):  # the whole list is checked before any request runs
        llm.generate([[1, 2], [1] * 40], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    got = []  # the good request is unaffected by the rejected ones
    while engine.has_unfinished_requests():
        got += [t for o in engine.step() for t in o.new_token_ids if o.request_id == good]
    assert got == reference(model, [1, 2, 3], 5)


def test_abort_frees_blocks_at_once_and_ends_the_request():
    model = random_model("llama", True)
    engine = LLMEngine(model, num_kv_blocks=16, block_size=4)
    a = engine.add_request([1] * 9, SamplingParams(max_tokens=20, **GREEDY))
    b = engine.add_request([2] * 5, SamplingParams(max_tokens=6, **GREEDY))
    for _ in range(3):
        engine.step()
    used = engine.cache.num_used_blocks
    assert engine.abort(a) and not engine.abort(a) and not engine.abort(12345)
    assert engine.cache.num_used_blocks < used
    engine.check_consistent()
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [b] and engine.cache.num_used_blocks == 0


@pytest.mark.parametrize("prefix,defer", [(False, False), ("radix", False), ("hash", True)])
def test_soak_thousand_requests_with_arrivals_and_aborts(prefix, defer):
    """>= 1000 requests, random lengths and arrival times, random aborts, a pool that forces preemption:
    every request ends exactly once, the pool is consistent after every step and empty at the end. With a
    prefix cache the prompts share prefixes; its blocks are checked too (evictable ones count as free).
    `defer`: admission deferred as with CUDA graphs, in a pool that lets 16 seats fill (it holds requests
    back while fewer than 2 are free), so here it is deferral rather than preemption that is exercised."""
    from nexus_lessons import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1)).eval()
    blocks = 160 if defer else 24
    engine = LLMEngine(model, num_kv_blocks=blocks, block_size=4, max_num_seqs=16 if defer else 12,
                       max_num_batched_tokens=32, enable_prefix_caching=prefix)
    engine.scheduler.defer_admission = defer
    held = 0  # steps that began with requests waiting and admission closed
    rng = random.Random(0)
    shared = [[rng.randrange(50) for _ in range(12)] for _ in range(4)]
    ended: dict[int, int] = {}
    live: set[int] = set()
    prompts: dict[int, tuple[list[int], int]] = {}
    added = 0
    steps = 0
    while added < 1000 or engine.has_unfinished_requests():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3]) if added < 1000 else 0):
            prompt = rng.choice(shared)[:rng.randint(0, 12)] + [rng.randrange(50) for _ in range(rng.randint(1, 18))]
            n = rng.randint(1, 20)
            sp = SamplingParams(max_tokens=n, temperature=rng.choice([0.0, 1.0]), ignore_eos=rng.random() < 0.5)
            rid = engine.add_request(prompt, sp)
            prompts[rid] = (prompt, n)
            live.add(rid)
            added += 1
        if live and rng.random() < 0.05:
            rid = rng.choice(sorted(live))
            assert engine.abort(rid)
            live.discard(rid)
            ended[rid] = ended.get(rid, 0) + 1
        sched = engine.scheduler
        held += bool(sched.waiting and sched.running and not sched._admission_open([]))
        for o in engine.step():
            if o.finished:
                assert o.request_id in live
                live.discard(o.request_id)
                ended[o.request_id] = ended.get(o.request_id, 0) + 1
                assert 1 <= len(o.sequence.output_token_ids) <= prompts[o.request_id][1]
        engine.check_consistent()
        steps += 1
    assert added >= 1000 and sorted(ended) == list(range(added)) and set(ended.values()) == {1}
    assert not engine.cache.sequences and engine.cache.num_free_blocks == blocks
    assert (held > 0) if defer else (engine.scheduler.num_preemptions > 0)
    assert not engine.requests and not live
    assert (engine.cache.prefix_hit_tokens > 0) == bool(prefix)


def test_serving_benchmark_smoke(tmp_path):
    """The GPU benchmark's CPU smoke mode: every section runs on a tiny model and lands in the JSON."""
    import json

    from nexus_lessons.bench import serving

    serving.main(["--smoke", "--out", str(tmp_path / "s.json")])
    r = json.loads((tmp_path / "s.json").read_text())
    assert set(r["sections"]) == set(serving.SECTIONS)
    assert not [name for name, row in r["sections"].items() if "error" in row]
    assert r["sections"]["check"]["all_equal"] and r["sections"]["throughput"]["output_tokens_per_s"] > 0
    for row in (r["sections"]["throughput"], r["sections"]["static"]["static"]):  # where a run's time went
        assert 0 < row["host_s"] + row["wait_s"] <= row["wall_s"] and row["compiles_in_run"] == []
    rows = r["sections"]["ablation"]["rows"]
    assert all("output_tokens_per_s" in row for row in rows.values())
    assert {"quantized KV int8", "quantized KV int4 (eager)", "speculative n-gram, k = 4",
            "shared-prefix workload: prefix caching"} < set(rows)
    assert rows["shared-prefix workload: prefix caching"]["prefix_hit_rate"] > 0
    assert rows["shared-prefix workload: engine"]["prefix_hit_rate"] == 0
    assert 0 <= rows["speculative n-gram, k = 4"]["acceptance_rate"] <= 1
    s = r["sections"]["static"]
    assert s["static"]["steps"] > s["continuous"]["steps"] and s["static"]["output_tokens"] == s["continuous"]["output_tokens"]


def test_the_lesson_exercises_describe_the_real_scheduler_and_bound():
    """The notebook's exercise references agree with the engine's Scheduler and the benchmark's bound."""
    from nexus_lessons.bench.serving import bandwidth_bound
    from nexus_lessons.engine.scheduler import Scheduler
    from nexus_lessons.engine.sequence import Sequence, Status
    from nexus_lessons.exercises import lesson10
    from nexus_lessons.paged import PagedKVCache

    rng = random.Random(5)
    for _ in range(20):
        cache = PagedKVCache(1, 1, 4, block_size=4, num_blocks=400)
        budget, seats = rng.randint(1, 60), rng.randint(1, 6)
        sched = Scheduler(cache, max_num_seqs=seats, max_num_batched_tokens=budget, max_model_len=1000)
        sched.watermark = 0
        running, waiting = [], []
        for rid in range(rng.randint(0, seats)):
            total = rng.randint(1, 50)
            computed = total - 1 if rng.random() < 0.6 else rng.randrange(total)
            seq = Sequence(rid, [1] * total, SamplingParams(max_tokens=5), seed=0, arrival_time=float(rid))
            sched.add(seq)
            sched.waiting.remove(seq)
            seq.status, seq.cache_seq, seq.num_computed = Status.RUNNING, cache.add_sequence(), computed
            cache.append_slots(seq.cache_seq, computed)
            sched.running.append(seq)
            running.append((rid, computed, total))
        for rid in range(len(running), len(running) + rng.randint(0, 4)):
            total = rng.randint(1, 70)
            sched.add(Sequence(rid, [1] * total, SamplingParams(max_tokens=5), seed=0, arrival_time=float(rid)))
            waiting.append((rid, total))
        batch = sched.schedule()
        got = sorted((s.request_id, n) for s, n in zip(batch.seqs, batch.num_new))
        assert got == sorted(lesson10._schedule(running, waiting, budget, seats))
    p, n = [rng.randint(1, 900) for _ in range(9)], [rng.randint(2, 70) for _ in range(9)]
    assert bandwidth_bound(p, n, 10**9, 4096, 2000.0) == pytest.approx(lesson10._bound(p, n, 10**9, 4096, 2000.0))


def test_the_cuda_graph_path_is_exact_with_graphs_emulated_on_the_cpu(monkeypatch):
    """The graph path's data layout (fixed staging views per batch size, padded rows writing the scratch
    slot, the fixed-width block table) checked on the CPU: each "graph" replays its recorded step eagerly
    into the same output buffer, reading the same device buffers as a captured CUDA graph would."""
    from nexus_lessons.engine import model_runner

    def record_eagerly(self, step):
        out = step()
        return (lambda: out.copy_(step())), out

    monkeypatch.setattr(model_runner.ModelRunner, "_record", record_eagerly)
    model = random_model("qwen2", True)
    engine = LLMEngine(model, num_kv_blocks=30, block_size=4, max_num_seqs=6, max_num_batched_tokens=12,
                       max_model_len=64)
    engine.runner.capture_graphs(model_runner.graph_batch_sizes(6))
    assert sorted(engine.runner.graphs) == [1, 2, 4, 6]
    engine.capacity = engine.cache.num_free_blocks * 4  # one block went to the scratch slot
    requests = mixed_requests(11, 9, model.config.vocab_size, max_prompt=19, max_new=15)
    got, batches = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        assert tokens == reference(model, prompt, sp.max_tokens)
    assert engine.stats["graph_steps"] > 0 and engine.stats["graph_steps"] < engine.stats["steps"]
    assert any(len(b) in (3, 5) and b.num_decode == len(b) for b in batches)  # padded to 4 and 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_with_graphs_is_exact_and_sizes_its_pool():
    model, tok = load_model("nexus-tiny", device="cuda")
    requests = mixed_requests(21, 10, model.config.vocab_size, max_prompt=60, max_new=30)
    engine = LLMEngine(model, tok, num_kv_blocks=24, block_size=8, max_num_seqs=6, max_num_batched_tokens=40)
    got, _ = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        want = generate(model, torch.tensor([prompt], device="cuda"), sp.max_tokens)[0, len(prompt):].tolist()
        assert tokens == want
    assert engine.stats["graph_steps"] > 0 and engine.scheduler.num_preemptions > 0
    auto = LLMEngine(model, tok, max_num_seqs=4, max_num_batched_tokens=256)
    assert auto.cache.num_blocks > 1000
    sp = SamplingParams(temperature=1.0, top_k=50, max_tokens=12, seed=3, ignore_eos=True)
    (a,), _ = run(auto, [([5, 6, 7], sp)])
    b = run(auto, [([5, 6, 7], sp)] + requests[:3])[0][0]
    assert a == b


def test_llm_loads_a_local_hf_folder(tmp_path):
    from nexus_lessons import save_pretrained

    model, tok = load_model("nexus-tiny")
    folder = save_pretrained(model, tmp_path / "ckpt", tok)
    llm = LLM(str(folder), device="cpu", num_kv_blocks=16)
    (out,) = llm.generate("while True:", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out.token_ids == reference(model, tok.encode("while True:"), 6) and isinstance(out.text, str)
