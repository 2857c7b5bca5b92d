"""PagedKVCache, its block allocator and block tables: no leaks, copy-on-write, and exactness.

The exactness invariant: greedy float32 generation through the paged cache equals `generate` with no
cache, token for token, for ragged batches, prompt lengths that are not multiples of the block size,
and block sizes 1, 5 and 16. Models are tiny random-init Llamas with large weights (std 0.2), so
logits are peaked and argmax ties cannot hide a wrong cache.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_lessons import ModelConfig, Transformer, generate
from nexus_lessons.kv_cache import CacheFullError
from nexus_lessons.paged import (
    BlockAllocator,
    BlockTables,
    OutOfBlocksError,
    PagedKVCache,
    forward_sequences,
)
from nexus_lessons.paged import paged_cache as paged_cache_module


# --- helpers ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread is faster, and immune to a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "llama-gqa": {"num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2-mha-bias": {"num_attention_heads": 4, "num_key_value_heads": 4, "attention_bias": True,
                       "model_type": "qwen2"},
}
_MODELS: dict[str, Transformer] = {}


def tiny_model(name: str = "llama-gqa") -> Transformer:
    if name not in _MODELS:
        torch.manual_seed(1234)
        cfg = ModelConfig(vocab_size=61, hidden_size=32, head_dim=16, intermediate_size=64, num_hidden_layers=2,
                          tie_word_embeddings=False, **CONFIGS[name])
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 or name.endswith("bias"):
                    p.normal_(0.0, 0.2)
            for layer in model.layers:  # norms stay at 1
                layer.input_layernorm.weight.fill_(1.0)
                layer.post_attention_layernorm.weight.fill_(1.0)
            model.norm.weight.fill_(1.0)
        _MODELS[name] = model
    return _MODELS[name]


def cache_for(model: Transformer, block_size: int, num_blocks: int = 64) -> PagedKVCache:
    return PagedKVCache.for_model(model, num_blocks, block_size)


def greedy_alone(model, tokens: list[int], n: int) -> list[int]:
    """The oracle: no-cache greedy generation of one sequence; returns the n new tokens."""
    return generate(model, [tokens], n)[0, len(tokens):].tolist()


def assert_no_leak(cache: PagedKVCache) -> None:
    cache.check_consistent()
    held = {b for s in cache.sequences for b in cache.block_table(s)}
    assert cache.num_free_blocks + len(held) == cache.num_blocks


# --- the allocator ----------------------------------------------------------------------------------
def test_allocator_basics():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate_many(2)
    assert (a, b) == (0, 1) and alloc.num_free == 2
    alloc.incref(a)
    assert alloc.refcount(a) == 2 and alloc.is_shared(a)
    assert alloc.free(a) is False and alloc.free(a) is True
    assert alloc.num_free == 3
    with pytest.raises(ValueError, match="free"):
        alloc.free(a)  # double free
    with pytest.raises(ValueError, match="free"):
        alloc.incref(a)  # sharing a free block
    with pytest.raises(ValueError):
        alloc.free(7)
    alloc.check_consistent([[b]])


def test_allocator_failed_multi_block_allocation_takes_nothing():
    alloc = BlockAllocator(5)
    alloc.allocate_many(3)
    with pytest.raises(OutOfBlocksError) as err:
        alloc.allocate_many(3)
    assert isinstance(err.value, CacheFullError)  # catchable as the contiguous caches' error
    assert err.value.num_needed == 3 and err.value.num_free == 2
    assert "out of KV blocks" in str(err.value)
    assert alloc.num_free == 2 and alloc.allocate_many(2) == [3, 4]
    with pytest.raises(OutOfBlocksError):
        alloc.allocate()
    alloc.check_consistent()


# Operations for the property test: (kind, which sequence, how many tokens).
_OPS = st.lists(
    st.tuples(st.sampled_from(["add", "fork", "append", "append", "append", "truncate", "free", "multi"]),
              st.integers(0, 10**6), st.integers(0, 13)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, block_size=st.sampled_from([1, 3, 4]), num_blocks=st.integers(1, 24))
def test_block_tables_never_leak_and_copy_on_write_isolates(ops, block_size, num_blocks):
    """Random add / fork / append / truncate / free: refcounts always count the tables exactly, a
    failed append changes nothing, every sequence reads back exactly its own tokens (copy-on-write
    keeps forks apart), full shared blocks stay shared, and freeing everything returns every block."""
    alloc = BlockAllocator(num_blocks)
    pool: list[object] = [None] * (num_blocks * block_size)  # what each slot holds: a fake K/V row

    def copy_blocks(src, dst):
        for s, d in zip(src, dst):
            pool[d * block_size:(d + 1) * block_size] = pool[s * block_size:(s + 1) * block_size]

    tables = BlockTables(alloc, block_size, copy_blocks)
    expected: dict[int, list[object]] = {}  # seq id -> its tokens, as it alone should see them
    counter = 0

    def write(appends):
        nonlocal counter
        before = {s: (tables.block_table(s), tables.num_tokens(s)) for s in tables.seq_ids()}
        free_before = alloc.num_free
        needed = tables.blocks_needed(appends)
        try:
            slots = tables.append_slots_many(appends)
        except OutOfBlocksError:
            assert needed > free_before
            assert alloc.num_free == free_before
            assert {s: (tables.block_table(s), tables.num_tokens(s)) for s in tables.seq_ids()} == before
            return
        assert alloc.num_free == free_before - needed  # the count was exact
        for s, ss in slots.items():
            for slot in ss:
                counter += 1
                pool[slot] = (s, counter)
                expected[s].append((s, counter))

    for kind, pick, n in ops:
        live = tables.seq_ids()
        seq = live[pick % len(live)] if live else None
        if kind == "add" or seq is None:
            expected[tables.add_sequence()] = []
        elif kind == "fork":
            child = tables.fork(seq)
            expected[child] = list(expected[seq])
            assert tables.block_table(child) == tables.block_table(seq)
        elif kind == "append":
            write({seq: n})
        elif kind == "multi":
            write({s: (n + i) % 5 for i, s in enumerate(live[:4])})
        elif kind == "truncate":
            keep = n % (tables.num_tokens(seq) + 1)
            tables.truncate(seq, keep)
            del expected[seq][keep:]
        elif kind == "free":
            tables.free(seq)
            del expected[seq]
        tables.check_consistent()
        for s in tables.seq_ids():
            assert [pool[slot] for slot in tables.slot_mapping(s)] == expected[s]
    tables.free_all()
    assert alloc.num_free == num_blocks
    alloc.check_consistent([])


def test_full_shared_blocks_stay_shared_partial_block_is_copied_once():
    alloc = BlockAllocator(10)
    copies = []
    tables = BlockTables(alloc, 4, lambda s, d: copies.append((list(s), list(d))))
    a = tables.add_sequence()
    tables.append_slots(a, 6)  # one full block + 2 tokens in the second
    b = tables.fork(a)
    c = tables.fork(a)
    assert [alloc.refcount(x) for x in tables.block_table(a)] == [3, 3]
    tables.append_slots_many({a: 1, b: 1, c: 1})  # all three write into the shared partial block
    assert len(copies) == 1 and len(copies[0][0]) == 2  # two copies, one batched call; the last writes in place
    full = tables.block_table(a)[0]
    assert tables.block_table(b)[0] == tables.block_table(c)[0] == full and alloc.refcount(full) == 3
    assert len({tables.block_table(s)[1] for s in (a, b, c)}) == 3
    tables.append_slots(a, 10)  # grows into new blocks; the full one is still shared
    assert alloc.refcount(full) == 3
    for s in (a, b, c):
        tables.free(s)
    assert alloc.num_free == 10


# --- the cache on a model: exactness ----------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_generate_equals_no_cache_ragged(config, block_size):
    model = tiny_model(config)
    prompts = [[3, 14, 15, 9, 26, 5, 35], [8, 9, 7], list(range(40, 53))]  # 7, 3, 13 tokens
    want = generate(model, prompts, 9)
    cache = cache_for(model, block_size)
    got = generate(model, prompts, 9, cache=cache)
    assert torch.equal(got, want)
    assert_no_leak(cache)
    # No padding is stored: each row holds exactly its real tokens (the last new token is not fed back).
    assert [cache.num_tokens(s) for s in cache.rows] == [7 + 8, 3 + 8, 13 + 8]
    used = sum(-(-cache.num_tokens(s) // block_size) for s in cache.rows)
    assert cache.num_used_blocks == used
    # The same cache object is reusable: generate() resets it.
    assert torch.equal(generate(model, prompts[1:2], 9, cache=cache), want[1:2, -12:])


def test_single_sequence_and_eos_padding():
    model = tiny_model()
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    want = generate(model, prompt, 12)
    eos = int(want[0, 14])  # a token it really emits, so rows finish early and get padded
    cache = cache_for(model, 4, num_blocks=10)
    assert torch.equal(generate(model, prompt, 12, cache=cache), want)
    prompts = [prompt[0], [1, 2]]
    assert torch.equal(generate(model, prompts, 12, cache=cache, eos_token_id=eos),
                       generate(model, prompts, 12, eos_token_id=eos))


def test_decode_steps_use_the_decode_kernel(monkeypatch):
    calls = {"decode": 0, "prefill": 0}
    decode, prefill = paged_cache_module.paged_decode_attention, paged_cache_module.paged_prefill_attention

    def counting(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(paged_cache_module, "paged_decode_attention", counting("decode", decode))
    monkeypatch.setattr(paged_cache_module, "paged_prefill_attention", counting("prefill", prefill))
    model = tiny_model()
    generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 4, cache=cache_for(model, 5))
    layers = model.config.num_hidden_layers
    assert calls == {"prefill": layers, "decode": 3 * layers}


# --- the sequence API: fork / copy-on-write, mixed batches, reservations, crop ------------------------
def _greedy_steps(model, cache, seqs: list[int], first: list[int], n: int) -> list[list[int]]:
    """Feed `first[i]` to seqs[i], then n-1 greedy steps for all of them together."""
    out = [[t] for t in first]
    for _ in range(n - 1):
        logits = forward_sequences(model, cache, seqs, [[o[-1]] for o in out])
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(t)
    logits = forward_sequences(model, cache, seqs, [[o[-1]] for o in out])
    return [o[1:] + [t] for o, t in zip(out, logits.argmax(-1).tolist())]


@pytest.mark.parametrize("block_size", [5, 16])
def test_fork_copy_on_write_diverges_exactly(block_size):
    model = tiny_model()
    prompt = [7, 1, 22, 33, 4, 50, 6, 17, 9, 10, 11, 30]  # 12 tokens: two full blocks of 5 + 2
    cache = cache_for(model, block_size, num_blocks=32)
    parent = cache.add_sequence()
    forward_sequences(model, cache, [parent], [prompt])
    child = cache.fork(parent)
    shared = cache.block_table(parent)
    assert cache.block_table(child) == shared
    assert all(cache.allocator.refcount(b) == 2 for b in shared)
    free_before = cache.num_free_blocks

    # The two forks continue differently; each must equal generating alone.
    got = _greedy_steps(model, cache, [parent, child], [40, 41], 6)
    assert got[0] == greedy_alone(model, prompt + [40], 6)
    assert got[1] == greedy_alone(model, prompt + [41], 6)

    full = len(prompt) // block_size
    pt, ct = cache.block_table(parent), cache.block_table(child)
    assert pt[:full] == ct[:full] == shared[:full]  # full prefix blocks: still shared
    assert all(cache.allocator.refcount(b) == 2 for b in shared[:full])
    assert pt[full] != ct[full]  # the partial block was copied for one of them
    assert cache.tables.num_copies == 1
    assert cache.num_free_blocks < free_before
    assert_no_leak(cache)
    cache.free(child)
    assert all(cache.allocator.refcount(b) == 1 for b in cache.block_table(parent))
    cache.free(parent)
    assert cache.num_free_blocks == cache.num_blocks


def test_fork_on_a_block_boundary_copies_nothing():
    model = tiny_model()
    prompt = list(range(1, 11))  # 10 tokens = two full blocks of 5
    cache = cache_for(model, 5, num_blocks=16)
    a = cache.add_sequence()
    forward_sequences(model, cache, [a], [prompt])
    b = cache.fork(a)
    got = _greedy_steps(model, cache, [a, b], [12, 13], 3)
    assert got == [greedy_alone(model, prompt + [12], 3), greedy_alone(model, prompt + [13], 3)]
    assert cache.tables.num_copies == 0
    assert cache.block_table(a)[:2] == cache.block_table(b)[:2]


def test_mixed_prefill_and_decode_batch_matches_running_alone():
    model = tiny_model()
    cache = cache_for(model, 5, num_blocks=32)
    a, b = cache.add_sequence(), cache.add_sequence()
    forward_sequences(model, cache, [a], [[9, 8, 7, 6, 5, 4]])
    # One forward: `a` decodes one token while `b` prefills 8 (left padding, never stored).
    logits = forward_sequences(model, cache, [a, b], [[3], [1, 2, 3, 4, 5, 6, 7, 8]])
    want_a = model(torch.tensor([[9, 8, 7, 6, 5, 4, 3]]))[0, -1]
    want_b = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))[0, -1]
    torch.testing.assert_close(logits[0], want_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], want_b, rtol=1e-4, atol=1e-4)
    assert (cache.num_tokens(a), cache.num_tokens(b)) == (7, 8)
    assert_no_leak(cache)


def test_append_slots_reserves_and_the_forward_fills_them():
    model = tiny_model()
    cache = cache_for(model, 4, num_blocks=8)
    s = cache.add_sequence()
    slots = cache.append_slots(s, 6)
    assert len(slots) == 6 and len(cache.block_table(s)) == 2 and cache.num_tokens(s) == 0
    free = cache.num_free_blocks
    prompt = [5, 4, 3, 2, 1, 9]
    logits = forward_sequences(model, cache, [s], [prompt])
    assert cache.num_free_blocks == free  # used the reservation, took nothing new
    assert cache.tables.slot_mapping(s) == slots
    torch.testing.assert_close(logits[0], model(torch.tensor([prompt]))[0, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no live sequence"):
        cache.append_slots(99, 1)


def test_crop_rolls_back_like_kv_cache():
    model = tiny_model()
    cache = cache_for(model, 3, num_blocks=16)
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    model(ids, cache=cache, attention_mask=mask)
    model(torch.tensor([[10, 11, 12], [13, 14, 15]]), cache=cache)  # speculated tokens
    assert cache.seq_len == 9
    cache.crop(7)  # keep one of the three
    assert [cache.num_tokens(s) for s in cache.rows] == [5, 7]
    out = model(torch.tensor([[20], [21]]), cache=cache)[:, -1]
    want = model(torch.tensor([[0, 0, 4, 5, 6, 7, 10, 20], [1, 2, 3, 4, 5, 6, 13, 21]]),
                 attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]))[:, -1]
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert_no_leak(cache)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(99)


# --- running out of blocks --------------------------------------------------------------------------
def test_generate_out_of_blocks_raises_and_leaks_nothing():
    model = tiny_model()
    cache = cache_for(model, 4, num_blocks=5)  # 20 tokens for 3 rows: the prompts fit, generation not
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    with pytest.raises(CacheFullError, match="out of KV blocks"):
        generate(model, prompts, 20, cache=cache)
    assert_no_leak(cache)
    cache.reset()
    assert cache.num_free_blocks == cache.num_blocks

    tiny = cache_for(model, 4, num_blocks=2)  # the prompts alone do not fit
    with pytest.raises(OutOfBlocksError):
        generate(model, prompts, 3, cache=tiny)
    assert tiny.num_free_blocks == tiny.num_blocks and tiny.sequences == []


def test_out_of_blocks_mid_batch_changes_nothing_then_recovers():
    model = tiny_model()
    cache = cache_for(model, 4, num_blocks=6)
    a, b = cache.add_sequence(), cache.add_sequence()
    forward_sequences(model, cache, [a, b], [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])  # 2 + 2 blocks
    c = cache.fork(a)  # shares a's partial block: its next write needs a copy
    before = {s: cache.block_table(s) for s in cache.sequences}
    free = cache.num_free_blocks
    with pytest.raises(OutOfBlocksError):
        # a: 1 copy-on-write block + 1; b: 2 more; c: in place (a copied) + 1: 5 > 2 free
        forward_sequences(model, cache, [a, b, c], [[1] * 5, [2] * 5, [3] * 5])
    assert cache.num_free_blocks == free
    assert {s: cache.block_table(s) for s in cache.sequences} == before
    assert [cache.num_tokens(s) for s in (a, b, c)] == [7, 8, 7]
    assert_no_leak(cache)
    # Preempt b, and the rest goes through, exactly.
    cache.free(b)
    got = _greedy_steps(model, cache, [a, c], [30, 31], 4)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    assert got == [greedy_alone(model, prompt + [30], 4), greedy_alone(model, prompt + [31], 4)]
    assert_no_leak(cache)


def test_bad_input_is_named():
    model = tiny_model()
    with pytest.raises(TypeError, match="float64"):
        generate(model, [[1, 2, 3]], 2, cache=PagedKVCache(2, 2, 16, 4, 8, dtype=torch.float64))
    cache = cache_for(model, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.tensor([[1], [2]]), cache=cache)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(2, 2, 8, 4, 0)
    with pytest.raises(ValueError, match="one row"):
        cache.bind([0, 0])


def test_random_scheduler_like_workload_is_exact():
    """Sequences arrive, prefill in chunks, decode together, fork and finish at random; every
    sequence's logits stay those of running it alone, and no block is ever leaked."""
    model = tiny_model()
    rng = random.Random(7)
    cache = cache_for(model, 3, num_blocks=40)
    tokens: dict[int, list[int]] = {}
    for _ in range(14):
        live = list(tokens)
        if not live or (rng.random() < 0.3 and len(live) < 4):
            s = cache.add_sequence()
            tokens[s] = []
            live.append(s)
        if live and rng.random() < 0.2:
            parent = rng.choice(live)
            if tokens[parent]:
                child = cache.fork(parent)
                tokens[child] = list(tokens[parent])
                live.append(child)
        batch = rng.sample(live, k=min(len(live), 3))
        new = [[rng.randrange(61) for _ in range(rng.choice([1, 1, 2, 4]))] for _ in batch]
        logits = forward_sequences(model, cache, batch, new)
        for s, n, lg in zip(batch, new, logits):
            tokens[s] += n
            assert int(lg.argmax()) == int(model(torch.tensor([tokens[s]]))[0, -1].argmax())
        if rng.random() < 0.25:
            done = rng.choice(list(tokens))
            cache.free(done)
            del tokens[done]
        assert_no_leak(cache)
        assert all(cache.num_tokens(s) == len(t) for s, t in tokens.items())
    cache.reset()
    assert cache.num_free_blocks == cache.num_blocks


# --- the lesson's fragmentation study and pictures ----------------------------------------------------
def test_fragmentation_is_deterministic_and_paging_wastes_under_a_block_per_request():
    from nexus_lessons.paged.fragmentation import (
        measure_fragmentation,
        sample_request_lengths,
        sweep_block_sizes,
    )

    r = measure_fragmentation(500, block_size=16, max_seq_len=2048, seed=3)
    assert r.as_dict() == measure_fragmentation(500, block_size=16, max_seq_len=2048, seed=3).as_dict()
    assert r.used_tokens != measure_fragmentation(500, seed=4).used_tokens
    prompt, output = sample_request_lengths(500, seed=3)
    assert (prompt >= 1).all() and (output >= 1).all() and (prompt + output <= 2048).all()
    assert r.used_tokens == int((prompt + output).sum())
    assert r.contiguous_reserved == 500 * 2048 and r.contiguous_waste > 0.5
    assert 0 <= r.paged_tail_waste <= 500 * 15 and r.paged_reserved == r.used_tokens + r.paged_tail_waste
    assert r.paged_waste < 0.05
    contiguous, paged = r.requests_that_fit(200_000, prompt + output)
    assert contiguous == 97 and paged > 3 * contiguous
    waste = [x.paged_waste for x in sweep_block_sizes((1, 4, 16, 64), num_requests=500, seed=3)]
    assert waste[0] == 0 and waste == sorted(waste)
    assert "waste %" in str(r)


def test_pictures_draw_live_caches_and_stepper_scripts():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nexus_lessons.paged.visualize import demo_stepper, draw_block_pool, snapshot

    stepper = demo_stepper()
    assert any("copy-on-write" in s.label for s in stepper.steps)
    assert stepper.steps[-1].num_free == 14 and stepper.steps[-1].tables.keys() == {3}
    for i in (3, 4, -1):
        plt.close(stepper.draw(i))
    model = tiny_model()
    cache = cache_for(model, 4, num_blocks=12)
    a = cache.add_sequence()
    forward_sequences(model, cache, [a], [[1, 2, 3, 4, 5, 6]])
    b = cache.fork(a)
    snap = snapshot(cache)
    assert snap.refcount[cache.block_table(a)[0]] == 2 and snap.holders()[cache.block_table(b)[1]] == [a, b]
    assert snap.block_fill() == {cache.block_table(a)[0]: 4, cache.block_table(a)[1]: 2}
    plt.close(draw_block_pool(cache, title="after fork"))


_INTERPRETER_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from nexus_lessons import ModelConfig, PagedKVCache, Transformer, generate
from nexus_lessons.kernels import interpreter_active, set_default_impl
from nexus_lessons.paged import forward_sequences

set_default_impl("triton")
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=61, hidden_size=32, head_dim=16, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
model = Transformer(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        if p.dim() > 1:
            p.normal_(0.0, 0.2)
prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]]
cache = PagedKVCache.for_model(model, 16, 5)
assert torch.equal(generate(model, prompts, 4, cache=cache), generate(model, prompts, 4))
assert interpreter_active()
a = cache.add_sequence()
forward_sequences(model, cache, [a], [prompts[0]])
b = cache.fork(a)  # copy-on-write, then a mixed batch: a decodes one token while b extends by two
logits = forward_sequences(model, cache, [a, b], [[40], [41, 42]])
want = [model(torch.tensor([prompts[0] + [40]])), model(torch.tensor([prompts[0] + [41, 42]]))]
assert cache.num_tokens(a) == 8 and cache.num_tokens(b) == 9 and cache.tables.num_copies == 1
for got, w in zip(logits, want):
    torch.testing.assert_close(got, w[0, -1], rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_triton_kernels_under_the_interpreter():
    """The same exactness with the real Triton kernels, run by the interpreter (a fresh process:
    TRITON_INTERPRET must be set before triton is imported)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", NEXUS_KERNEL_IMPL="triton", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_generate_builds_a_paged_cache_by_name():
    from conftest import hf_model

    import nexus_lessons as nl

    ours = nl.from_hf(hf_model("llama", tie=False, seed=5))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    ref = nl.generate(ours, prompts, 19)
    assert torch.equal(nl.generate(ours, prompts, 19, cache="paged"), ref)
