"""The engine's options from lessons 03-05: prefix caching, quantized KV, speculative decoding.

Exactness as in test_engine.py: greedy float32 tokens per request equal plain `generate` with no cache,
under prefix caching (hash and radix; shared prefixes, a repeated prompt, a prompt that is an earlier
prompt + its output; a pool small enough to evict and preempt), speculative n-gram and draft decoding
(k = 1 and k >= 5, stop tokens and max_tokens cutting into the accepted drafts) and their combination.
Quantized KV is not exact against plain `generate`: there the reference is `generate` over a
`PagedKVCache` of the same format, batch 1.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import GREEDY, mixed_requests, random_model, reference, run

from nexus_lessons import generate, load_model
from nexus_lessons.engine import LLMEngine, SamplingParams
from nexus_lessons.paged import PagedKVCache


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_prefix_requests(seed: int, vocab: int) -> list:
    """Requests that share prefixes (two system prompts, one not block-aligned), and a repeated prompt."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(n)] for n in (13, 8)]
    out = []
    for i in range(10):
        prompt = systems[i % 2] + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
        out.append((prompt, SamplingParams(max_tokens=rng.randint(1, 12), **GREEDY)))
    out.append((list(out[0][0]), SamplingParams(max_tokens=9, **GREEDY)))  # a repeated prompt
    return out


@pytest.mark.parametrize("kind,family", [("hash", "llama"), ("radix", "qwen2")])
def test_prefix_caching_is_exact_with_eviction_and_preemption(kind, family):
    model = random_model(family, family == "llama")
    engine = LLMEngine(model, enable_prefix_caching=kind, num_kv_blocks=14, block_size=4, max_num_seqs=6,
                       max_num_batched_tokens=16)
    first = shared_prefix_requests(3, model.config.vocab_size)
    got, _ = run(engine, first)
    # the second wave: earlier prompts + their outputs (a chat's next turn), plus new tokens
    second = [(p + o + [5, 7], SamplingParams(max_tokens=6, **GREEDY)) for (p, _), o in zip(first[:6], got)]
    got2, _ = run(engine, second)
    for (prompt, sp), tokens in zip(first + second, got + got2):
        assert tokens == reference(model, prompt, sp.max_tokens), f"prompt of {len(prompt)}"
    assert engine.scheduler.num_preemptions > 0  # the pool is too small for the batch
    assert engine.cache.prefix_hit_tokens > 0 and not engine.cache.sequences
    assert engine.cache.allocator.num_evictable > 0  # what is cached is evictable, counted as free
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_a_preempted_request_finds_its_own_prefix_again():
    """Preemption followed by a hit: the re-admitted request starts after its cached tokens, exactly."""
    model = random_model("llama", True)
    engine = LLMEngine(model, enable_prefix_caching="radix", num_kv_blocks=9, block_size=4, max_num_seqs=4,
                       max_num_batched_tokens=64)
    requests = mixed_requests(5, 8, model.config.vocab_size, max_prompt=10, max_new=24)
    ids = [engine.add_request(p, sp) for p, sp in requests]
    seqs = {}
    while engine.has_unfinished_requests():
        seqs |= {o.request_id: o.sequence for o in engine.step() if o.finished}
        engine.check_consistent()
    for (prompt, sp), i in zip(requests, ids):
        assert seqs[i].output_token_ids == reference(model, prompt, sp.max_tokens)
    assert engine.scheduler.num_preemptions > 0
    # hits beyond those at first admission: re-admitted requests started after their own cached tokens
    assert engine.cache.prefix_hit_tokens > sum(s.num_cached_tokens for s in seqs.values())


def other_model(family: str, seed: int):
    torch.manual_seed(seed)
    return random_model(family, True)


@pytest.mark.parametrize("method,k,family", [("ngram", 1, "llama"), ("ngram", 5, "qwen2"), ("draft", 1, "qwen2"),
                                             ("draft", 6, "llama"), ("self", 5, "qwen2")])
def test_speculative_decoding_is_exact(method, k, family):
    """n-gram and draft proposals (a different random model; the target itself, whose drafts are always all
    accepted, so max_tokens cuts into them); mixed lengths and a small pool that preempts."""
    model = random_model(family, family == "llama")
    spec = {"method": "ngram" if method == "ngram" else "draft", "num_speculative_tokens": k}
    if method != "ngram":
        spec["model"] = model if method == "self" else other_model(family, 1)
    engine = LLMEngine(model, speculative=spec, num_kv_blocks=24, block_size=4, max_num_seqs=6,
                       max_num_batched_tokens=32)
    requests = mixed_requests(9, 10, model.config.vocab_size, max_prompt=19, max_new=23)
    got, _ = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        assert tokens == reference(model, prompt, sp.max_tokens), f"prompt of {len(prompt)}"
    s = engine.stats
    assert s["spec_steps"] > 0 and s["spec_accepted"] > 0 and not engine.cache.sequences
    assert engine.scheduler.num_preemptions > 0
    if method == "self":
        assert s["spec_accepted"] == s["spec_proposed"]
    if method == "draft":
        assert not engine.spec.speculator.proposer.cache.sequences  # the draft's state went with each request


def test_speculative_steps_stream_several_tokens_and_stop_inside_the_drafts():
    model = random_model("llama", True)
    prompt = [5, 17, 3, 44, 9]
    full = reference(model, prompt, 14)
    engine = LLMEngine(model, speculative={"method": "draft", "num_speculative_tokens": 5, "model": model},
                       num_kv_blocks=32, block_size=4)
    stop = full[7]  # well inside one step's accepted drafts
    (out,), _ = run(engine, [(prompt, SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop]))])
    assert out == full[:full.index(stop) + 1]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=14, **GREEDY))
    chunks = []
    while engine.has_unfinished_requests():
        chunks += [o.new_token_ids for o in engine.step() if o.request_id == rid]
    assert sum(chunks, []) == full and max(len(c) for c in chunks) == 6  # k + 1 tokens in one step
    # an aborted request frees its draft state with its blocks
    rid = engine.add_request(prompt, SamplingParams(max_tokens=14, **GREEDY))
    engine.step(), engine.step()
    assert engine.spec.speculator.proposer.cache.sequences and engine.abort(rid)
    assert not engine.spec.speculator.proposer.cache.sequences and not engine.cache.sequences


@pytest.mark.parametrize("kind,method", [("hash", "ngram"), ("radix", "draft")])
def test_prefix_caching_with_speculative_decoding_is_exact(kind, method):
    model = random_model("qwen2", False)
    spec = {"method": method, "num_speculative_tokens": 4}
    if method == "draft":
        spec["model"] = model  # always accepted: the drafts run into max_tokens
    engine = LLMEngine(model, enable_prefix_caching=kind, speculative=spec, num_kv_blocks=20, block_size=4,
                       max_num_seqs=5, max_num_batched_tokens=24)
    first = shared_prefix_requests(4, model.config.vocab_size)
    got, _ = run(engine, first)
    second = [(p + o, SamplingParams(max_tokens=7, **GREEDY)) for (p, _), o in zip(first[:4], got)]
    got2, _ = run(engine, second)
    for (prompt, sp), tokens in zip(first + second, got + got2):
        assert tokens == reference(model, prompt, sp.max_tokens)
    assert engine.cache.prefix_hit_tokens > 0 and engine.stats["spec_accepted"] > 0 and not engine.cache.sequences


def test_nexus_tiny_with_its_draft_is_exact():
    model, tok = load_model("nexus-tiny")
    draft, _ = load_model("nexus-tiny-draft", tokenizer=False)
    engine = LLMEngine(model, tok, speculative={"method": "draft", "num_speculative_tokens": 5, "model": draft},
                       enable_prefix_caching=True, num_kv_blocks=24, block_size=8)
    prompts = [tok.encode(p) for p in ["def fibonacci(n):", "import os\nimport sys\n", "def fibonacci(n):\n    if"]]
    requests = [(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, [21, 9, 17])]
    got, _ = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        assert tokens == reference(model, prompt, sp.max_tokens)
    assert engine.stats["spec_accepted"] > 0


@pytest.mark.parametrize("fmt,family", [("int8", "llama"), ("int4", "qwen2"), ("fp8", "llama")])
def test_quantized_kv_equals_generate_over_the_same_format(fmt, family):
    """Each request's tokens equal `generate` (batch 1) over a PagedKVCache of the same format: the same
    quantization, written and read by the same kernels. Whole prompts in one chunk and no preemption (a
    chunk boundary, or a recompute, changes which K/V are read quantized: not the same computation)."""
    model = random_model(family, family == "llama")
    engine = LLMEngine(model, kv_cache_dtype=fmt, num_kv_blocks=60, block_size=6, max_num_seqs=5,
                       max_num_batched_tokens=128)
    requests = mixed_requests(13, 8, model.config.vocab_size, max_prompt=21, max_new=15)
    got, batches = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        cache = PagedKVCache.for_model(model, 8, 6, kv_cache_dtype=fmt)
        want = generate(model, torch.tensor([prompt]), sp.max_tokens, cache=cache)[0, len(prompt):].tolist()
        assert tokens == want, f"prompt of {len(prompt)}"
    assert engine.scheduler.num_preemptions == 0 and any(0 < b.num_decode < len(b) for b in batches)
    assert engine.cache.quant is not None and not engine.cache.sequences
    if fmt == "int4":  # tail slots are reused (released lazily, at the next step's plan): no growth past the batch
        assert engine.cache.quant.num_tail_slots <= 2 * 5


def test_every_option_together_keeps_the_pool_consistent():
    """int4 blocks + hash prefix caching + n-gram speculation + preemption: no exactness claim (quantized),
    but every request ends with its length, and the pool is checked after every step."""
    model = random_model("llama", True)
    engine = LLMEngine(model, kv_cache_dtype="int4", enable_prefix_caching=True, num_kv_blocks=16, block_size=4,
                       speculative={"method": "ngram", "num_speculative_tokens": 3}, max_num_seqs=5,
                       max_num_batched_tokens=24)
    requests = shared_prefix_requests(6, model.config.vocab_size)
    got, _ = run(engine, requests)
    assert [len(t) for t in got] == [sp.max_tokens for _, sp in requests]
    assert engine.cache.prefix_hit_tokens > 0 and engine.scheduler.num_preemptions > 0
    assert not engine.cache.sequences and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_int8_decode_steps_through_the_cuda_graph_layout(monkeypatch):
    """int8 blocks on the CUDA-graph path, graphs emulated on the CPU as in test_engine.py (padded rows write
    the scratch slot): still `generate` over an int8 PagedKVCache."""
    from nexus_lessons.engine import model_runner

    def record_eagerly(self, step):
        out = step()
        return (lambda: out.copy_(step())), out

    monkeypatch.setattr(model_runner.ModelRunner, "_record", record_eagerly)
    model = random_model("qwen2", True)
    engine = LLMEngine(model, kv_cache_dtype="int8", num_kv_blocks=40, block_size=4, max_num_seqs=6,
                       max_num_batched_tokens=64, max_model_len=64)
    engine.runner.capture_graphs(model_runner.graph_batch_sizes(6))
    engine.capacity = engine.cache.num_free_blocks * 4
    requests = mixed_requests(11, 7, model.config.vocab_size, max_prompt=19, max_new=15)
    got, _ = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        cache = PagedKVCache.for_model(model, 10, 4, kv_cache_dtype="int8")
        assert tokens == generate(model, torch.tensor([prompt]), sp.max_tokens, cache=cache)[0, len(prompt):].tolist()
    assert engine.stats["graph_steps"] > 0 and engine.scheduler.num_preemptions == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_quantized_kv_equals_generate_over_the_same_format(fmt):
    """Compiled kernels; int8 decode steps replayed as CUDA graphs, int4 eager."""
    model, tok = load_model("nexus-tiny", device="cuda")
    engine = LLMEngine(model, tok, kv_cache_dtype=fmt, num_kv_blocks=64, block_size=16, max_num_seqs=6,
                       max_num_batched_tokens=512)
    requests = mixed_requests(21, 10, model.config.vocab_size, max_prompt=60, max_new=30)
    got, _ = run(engine, requests)
    for (prompt, sp), tokens in zip(requests, got):
        cache = PagedKVCache.for_model(model, 8, 16, kv_cache_dtype=fmt)
        want = generate(model, torch.tensor([prompt], device="cuda"), sp.max_tokens, cache=cache)
        assert tokens == want[0, len(prompt):].tolist()
    assert (engine.stats["graph_steps"] > 0) == (fmt == "int8")
