"""Prefix caching (lesson 04): both designs give exactly the tokens of generation without a cache, never
leak, double-free or evict a block in use, and serve the most any cache could.

Models are tiny random Llama / Qwen2 models with peaked logits (as in test_paged_cache.py) and the shipped
nexus-tiny. The property test drives a real `PagedKVCache` without a model: every slot it writes holds a
code for the exact token prefix whose K/V it stands for, so a wrong hit, a write into a shared block or a
freed block still in use shows up as a wrong code.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
import torch
from conftest import hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nexus_lessons as nl
from nexus_lessons import PagedKVCache, PrefixCache, RadixPrefixCache, generate
from nexus_lessons.paged import BlockAllocator, OutOfBlocksError, forward_sequences
from nexus_lessons.prefix.workloads import hit_rate, ideal_hit, multi_turn_chat, run_prompts

DESIGNS = ["hash", "radix"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict[str, nl.Transformer] = {}


def model_of(family: str = "llama") -> nl.Transformer:
    if family not in _MODELS:
        _MODELS[family] = nl.from_hf(hf_model(family, tie=family == "qwen2", seed=3, vocab=97, hidden=32, heads=4,
                                              kv_heads=2, inter=64))
    return _MODELS[family]


@contextmanager
def cached_blocks_untouched(cache: PagedKVCache):
    """Every block cached on entry and never evicted meanwhile holds the same K/V on exit: nobody wrote
    into a block the prefix cache shares."""
    before = {b: torch.stack([cache.k[:, b], cache.v[:, b]]).clone() for b in cache.prefix_cache.blocks()}
    released, release = set(), cache.allocator.release

    def recording(block):
        released.add(block)
        return release(block)

    cache.allocator.release = recording
    try:
        yield
    finally:
        del cache.allocator.release
    for b, kv in before.items():
        if b not in released:
            assert torch.equal(torch.stack([cache.k[:, b], cache.v[:, b]]), kv), f"cached block {b} was written"


def rand_tokens(rng: random.Random, n: int, vocab: int = 97) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


# --- exactness on models ----------------------------------------------------------------------------
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hits_at_block_multiples_and_partial_blocks_are_exact(design, family):
    """Prompts of exactly 2 and 3 blocks (a full hit still computes the last token), and lengths that end
    mid-block; repeats, prefixes of earlier prompts and earlier prompt + output; the cache never writes a
    cached block, and the hits are the most any cache of this design could give."""
    model, bs = model_of(family), 4
    rng = random.Random(1)
    base = rand_tokens(rng, 12)
    prompts = [base[:8], base[:8], base, base, base[:10], base[:10] + rand_tokens(rng, 3), base[:7]]
    cache = PagedKVCache.for_model(model, 64, bs, prefix_cache=design)
    computed: list[list[int]] = []
    for p in prompts:
        want = generate(model, [p], 5)
        hits = cache.prefix_hit_tokens
        with cached_blocks_untouched(cache):
            assert torch.equal(generate(model, [p], 5, cache=cache), want)
        assert cache.prefix_hit_tokens - hits == ideal_hit(p, computed, bs if design == "hash" else None)
        cache.check_consistent()
        computed.append(want[0, :-1].tolist())
        grown = want[0].tolist()  # the next prompt is this one plus its output
        want2 = generate(model, [grown], 4)
        hits = cache.prefix_hit_tokens
        assert torch.equal(generate(model, [grown], 4, cache=cache), want2)
        assert cache.prefix_hit_tokens - hits == ideal_hit(grown, computed, bs if design == "hash" else None)
        computed.append(want2[0, :-1].tolist())
    assert cache.sequences == [] and cache.num_free_blocks == cache.num_blocks  # all cached, none in use
    assert cache.prefix_cache.num_cached_blocks > 0


@pytest.mark.parametrize("design", DESIGNS)
def test_ragged_batch_with_shared_prefixes_and_eos(design):
    model = model_of()
    rng = random.Random(2)
    system = rand_tokens(rng, 9)
    prompts = [system + rand_tokens(rng, n) for n in (3, 6, 1)]
    cache = PagedKVCache.for_model(model, 64, 5, prefix_cache=design)
    generate(model, [system + rand_tokens(rng, 2)], 3, cache=cache)  # warm the system prompt
    want = generate(model, prompts, 7)
    eos = int(want[0, -3])
    hits = cache.prefix_hit_tokens
    assert torch.equal(generate(model, prompts, 7, cache=cache), want)
    assert cache.prefix_hit_tokens - hits == 3 * (5 if design == "hash" else 9)
    want_eos = generate(model, prompts, 7, eos_token_id=eos)
    assert torch.equal(generate(model, prompts, 7, cache=cache, eos_token_id=eos), want_eos)
    cache.check_consistent()


@pytest.mark.parametrize("design", DESIGNS)
def test_eviction_under_memory_pressure_is_exact(design):
    """A pool that holds about two requests; nine requests over four prompt families. Cached blocks are
    evicted to make room (the pool is never short while some are evictable), and outputs stay exact."""
    model, bs = model_of(), 4
    rng = random.Random(3)
    families = [rand_tokens(rng, 10) for _ in range(4)]
    cache = PagedKVCache.for_model(model, 10, bs, prefix_cache=design)
    evicted = []
    evict = cache.prefix_cache.evict
    cache.allocator.evictor = lambda n: evicted.append(evict(n))
    for i in range(9):
        p = families[i % 4] + rand_tokens(rng, 1 + i % 3)
        want = generate(model, [p], 6)
        with cached_blocks_untouched(cache):
            assert torch.equal(generate(model, [p], 6, cache=cache), want)
        cache.check_consistent()
    assert sum(evicted) > 0
    # The whole pool for one request: every cached block must make way.
    assert cache.prefix_cache.num_cached_blocks > 0
    long = rand_tokens(rng, 4 * bs * 2)
    assert torch.equal(generate(model, [long], 2 * bs + 1, cache=cache), generate(model, [long], 2 * bs + 1))
    assert cache.num_free_blocks == cache.num_blocks


@pytest.mark.parametrize("design", DESIGNS)
def test_scheduler_api_preemption_then_hit(design):
    """The engine's calls: add_sequence(prompt) attaches the cached prefix, only the rest is fed; a
    preempted sequence is freed with its tokens and resumes from the cache with every token it had."""
    model, bs = model_of(), 4
    rng = random.Random(4)
    system = rand_tokens(rng, 11)
    cache = PagedKVCache.for_model(model, 40, bs, prefix_cache=design)
    a = cache.add_sequence(system + [5, 6])
    assert cache.num_tokens(a) == 0
    forward_sequences(model, cache, [a], [system + [5, 6]])
    assert cache.cache_tokens(a) == 13 // bs  # a running sequence caches its full blocks now
    b_prompt = system + [7, 8, 9]
    b = cache.add_sequence(b_prompt)
    # While a still runs: two full blocks of the system prompt (hash), or all 11 tokens (radix).
    assert cache.num_tokens(b) == (8 if design == "hash" else 11)
    tokens = {a: system + [5, 6], b: b_prompt}
    hit = cache.num_tokens(b)
    logits = forward_sequences(model, cache, [a, b], [[5], b_prompt[hit:]])
    tokens[a].append(5)
    for _ in range(4):
        nxt = logits.argmax(-1).tolist()
        for s, t in zip((a, b), nxt):
            tokens[s].append(t)
        logits = forward_sequences(model, cache, [a, b], [[t] for t in nxt])
    # Preempt b (free it with its tokens: all but the newest are computed), then resume it.
    last = logits.argmax(-1).tolist()
    cache.free(b, tokens[b])
    cache.check_consistent()
    b2 = cache.add_sequence(tokens[b])
    n = cache.num_tokens(b2)
    assert n == (len(tokens[b]) - 1 if design == "radix" else (len(tokens[b]) - 1) // bs * bs)
    out = forward_sequences(model, cache, [a, b2], [[last[0]], tokens[b][n:]])
    tokens[a].append(last[0])
    for s, lg in zip((a, b2), out):
        want = model(torch.tensor([tokens[s] if s == a else tokens[b]]))[0, -1]
        torch.testing.assert_close(lg, want, rtol=1e-4, atol=1e-4)
    cache.free(a, tokens[a])
    cache.free(b2, tokens[b])
    cache.check_consistent()
    cache.prefix_cache.clear()
    assert cache.num_free_blocks == cache.num_blocks and cache.allocator.num_evictable == 0


def test_multi_turn_chat_hits_its_ideal_on_nexus_tiny():
    model, _ = nl.load_model("nexus-tiny")
    for design in DESIGNS:
        cache = PagedKVCache.for_model(model, 96, 16, prefix_cache=design)
        records, history = multi_turn_chat(model, cache, conversations=2, turns=3, system_len=40, user_len=9,
                                           reply_len=6, vocab=model.config.vocab_size, seed=5)
        field = f"ideal_{design}"
        assert [r.hit for r in records] == [getattr(r, field) for r in records]
        assert hit_rate(records) == hit_rate(records, field) > 0.5
        for conv in history:  # the whole conversation is what generate without a cache gives, turn by turn
            assert len(conv) == 40 + 3 * (9 + 6)
        cache.check_consistent()
    prompts = [history[0][:40 + 9], history[0][:40 + 9]]
    rows = run_prompts(model, PagedKVCache.for_model(model, 32, 16, prefix_cache="radix"), prompts, 6)
    assert [r.hit for r in rows] == [0, 48]
    assert generate(model, [prompts[0]], 6)[0].tolist() == history[0][:40 + 9 + 6]


def test_hash_collisions_cost_a_miss_never_a_wrong_answer():
    """A hash with three values: almost every key collides. Hits must still be exact."""
    model, bs = model_of(), 4
    rng = random.Random(6)
    cache = PagedKVCache.for_model(model, 48, bs, prefix_cache=PrefixCache(hash_fn=lambda parent, toks: hash(
        (parent, toks)) % 3))
    base = rand_tokens(rng, 8)
    for p in [base + [1, 2, 3], rand_tokens(rng, 11), base + [1, 2, 3], base[:4] + rand_tokens(rng, 6)]:
        assert torch.equal(generate(model, [p], 4, cache=cache), generate(model, [p], 4))
        cache.check_consistent()
    assert cache.prefix_hit_tokens > 0


def test_the_suffix_alone_goes_through_the_extend_kernel(monkeypatch):
    from nexus_lessons.paged import paged_cache as module

    seen = []
    prefill = module.paged_prefill_attention

    def counting(q, *args, **kwargs):
        seen.append(q.shape[0])
        return prefill(q, *args, **kwargs)

    monkeypatch.setattr(module, "paged_prefill_attention", counting)
    model = model_of()
    cache = PagedKVCache.for_model(model, 32, 4, prefix_cache="radix")
    p = list(range(1, 22))
    generate(model, [p], 3, cache=cache)
    seen.clear()
    generate(model, [p[:-1] + [50, 51]], 3, cache=cache)
    assert seen == [2] * model.config.num_hidden_layers  # 20 cached tokens, only the 2 new ones computed


def test_bad_input_is_named():
    model = model_of()
    with pytest.raises(ValueError, match="prefix_cache"):
        PagedKVCache.for_model(model, 8, 4, prefix_cache="lru")
    radix = RadixPrefixCache()
    PagedKVCache.for_model(model, 8, 4, prefix_cache=radix)
    with pytest.raises(ValueError, match="another block pool"):
        PagedKVCache.for_model(model, 8, 4, prefix_cache=radix)
    cache = PagedKVCache.for_model(model, 8, 4, prefix_cache="hash")
    with pytest.raises(ValueError, match="empty prompt"):
        cache.add_sequence([])
    with pytest.raises(TypeError, match="ints"):
        cache.add_sequence([1, 2.5])
    s = cache.add_sequence([1, 2, 3])
    with pytest.raises(ValueError, match="do not start with the prompt"):
        cache.free(s, [1, 9, 3, 4])
    with pytest.raises(RuntimeError, match="not plugged"):
        PrefixCache().match([1, 2, 3])
    alloc = BlockAllocator(4)
    (blk,) = alloc.allocate_many(1)
    alloc.hold(blk)
    with pytest.raises(ValueError, match="cached already"):
        alloc.hold(blk)
    alloc.free(blk)
    with pytest.raises(ValueError, match="only the prefix cache holds it"):
        alloc.free(blk)


# --- the property test --------------------------------------------------------------------------------
_OPS = st.lists(
    st.tuples(st.sampled_from(["serve", "serve", "serve", "add", "feed", "feed", "fork", "free", "cache", "evict",
                               "truncate"]),
              st.integers(0, 10**6), st.integers(1, 9), st.integers(0, 4)),
    min_size=8, max_size=40,
)
_BASES = [[1, 2, 1, 2, 3, 1, 2, 3, 3, 1], [1, 2, 1, 3, 3, 2], [2, 2, 2, 2, 2, 2, 2, 2, 2], [3, 1]]


def _make_prefix_cache(design):
    if design == "hash-collide":
        return PrefixCache(hash_fn=lambda parent, toks: hash((parent, toks)) % 4)
    return design


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(3, 16),
       design=st.sampled_from(["hash", "radix", "hash-collide"]))
def test_random_insert_match_evict_free_never_leaks_or_serves_a_wrong_block(ops, block_size, num_blocks, design):
    """Random requests (add a prompt with its longest cached prefix, feed the rest and some new tokens,
    free it with its tokens), interleaved with running sequences that feed, fork, truncate, cache their
    full blocks or are freed, and explicit evictions, on a real PagedKVCache without a model: each
    written slot holds a code for the token prefix its K/V stand for. Prompts share prefixes and reuse
    earlier requests' tokens. After every step: refcounts count exactly the block tables and the cache's
    references, the evictable blocks are exactly the cached ones nobody uses, and every live sequence
    reads back exactly its own prefix codes (no wrong hit, no write into a shared block, no block in use
    evicted or handed out again). A forward the pool cannot hold changes nothing, the cache included."""
    cache = PagedKVCache(1, 1, 1, block_size, num_blocks, dtype=torch.float64,
                         prefix_cache=_make_prefix_cache(design))
    codes: dict[tuple[int, ...], float] = {}
    tokens: dict[int, list[int]] = {}  # seq id -> every token id it has or will be fed (computed ones first)
    finished: list[list[int]] = []
    rng = random.Random(len(ops) * 31 + num_blocks)

    def code(prefix):
        return codes.setdefault(tuple(prefix), float(len(codes) + 1))

    def check():
        cache.check_consistent()
        in_use = {b for s in cache.sequences for b in cache.block_table(s)}
        assert not in_use & set(cache.allocator.evictable_blocks())
        assert cache.num_free_blocks == num_blocks - len(in_use)
        pool = cache.k.view(-1)
        for s, toks in tokens.items():
            n = cache.num_tokens(s)
            got = [float(pool[cache.tables.slot(s, p)]) for p in range(n)]
            assert got == [code(toks[:p + 1]) for p in range(n)], f"sequence {s} reads wrong K/V"

    def add(pick, which):
        if which == 4 and finished:  # an earlier request's tokens, and more: the next turn of a chat
            prompt = finished[pick % len(finished)] + [rng.randrange(1, 4) for _ in range(pick % 3)]
        else:
            base = _BASES[which % 4]
            prompt = base[: 1 + pick % len(base)] + [rng.randrange(1, 4) for _ in range(pick % 3)]
        before = cache.prefix_hit_tokens
        s = cache.add_sequence(prompt)
        hit = cache.num_tokens(s)
        assert hit == cache.prefix_hit_tokens - before < len(prompt)
        assert design == "radix" or hit % block_size == 0
        tokens[s] = prompt
        check()  # the attached prefix reads back right
        return s

    def feed(seq, n) -> bool:
        done = cache.num_tokens(seq)
        while len(tokens[seq]) < done + n:
            tokens[seq].append(rng.randrange(1, 4))
        cache.bind([seq])
        before = {s: cache.block_table(s) for s in cache.sequences}
        cached = sorted(cache.prefix_cache.blocks())
        try:
            cache.begin_forward(torch.zeros(1, n, dtype=torch.long))
        except OutOfBlocksError:  # changes nothing, and evicts nothing either
            assert {s: cache.block_table(s) for s in cache.sequences} == before
            assert sorted(cache.prefix_cache.blocks()) == cached
            return False
        for p, slot in enumerate(cache._plan.slot_mapping.tolist()):
            cache.k.view(-1)[slot] = code(tokens[seq][: done + p + 1])
        return True

    def free(seq, with_tokens):
        toks = tokens.pop(seq)
        done = cache.num_tokens(seq)
        cache.free(seq, toks if with_tokens else None)
        if done:
            finished.append(toks[:done])

    for kind, pick, n, which in ops:
        live = cache.sequences
        seq = live[pick % len(live)] if live else None
        if kind == "serve" or seq is None:
            s = add(pick, which)
            if feed(s, len(tokens[s]) - cache.num_tokens(s) + n % 4):
                free(s, True)
        elif kind == "add":
            add(pick, which)
        elif kind == "feed":
            feed(seq, n)
        elif kind == "fork":
            child = cache.fork(seq)
            tokens[child] = list(tokens[seq][: cache.num_tokens(seq)])
        elif kind == "truncate":
            keep = n % (cache.num_tokens(seq) + 1)
            cache.truncate(seq, keep)
            del tokens[seq][keep:]
        elif kind == "cache":
            cache.cache_tokens(seq, tokens[seq][: cache.num_tokens(seq)])
        elif kind == "free":
            free(seq, which % 2)
        elif kind == "evict":
            free_before = len(cache.allocator.free_blocks())
            freed = cache.prefix_cache.evict(n)
            assert len(cache.allocator.free_blocks()) == free_before + freed
        check()
    cache.reset()
    tokens.clear()
    check()
    cache.prefix_cache.clear()
    assert cache.num_free_blocks == num_blocks and cache.prefix_cache.blocks() == []
    assert len(cache.allocator.free_blocks()) == num_blocks


# --- the benchmark's CPU smoke mode ---------------------------------------------------------------------
def test_prefix_ttft_benchmark_smoke(tmp_path):
    """The GPU benchmark's code path on a tiny model: exactness asserted (generate and the planned first
    forward the GPU captures as a graph), timings and the chat's hit rate equal to its ideal written."""
    import json

    from nexus_lessons.bench import prefix_ttft

    prefix_ttft.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "prefix_ttft_smoke.json").read_text())
    assert all(saved["check_float32"].values()) and len(saved["check_float32"]) == 8
    assert saved["ttft"]["radix"]["prompt_tokens_served_from_cache"] == saved["prefix_len"]
    assert saved["ttft"]["no prefix cache"]["prompt_tokens_served_from_cache"] == 0
    assert all(saved["chat"][d]["equals_ideal"] and saved["chat"][d]["hit_rate"] > 0.3 for d in DESIGNS)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            prefix_ttft.main(["--out", str(tmp_path)])
