"""The reference docs' batching loop runs as written, and every batcher is exact.

Static, continuous (recompute) and iteration-level (paged cache, with preemption) batching must all
give each request the tokens plain `generate` gives it alone; continuous batching needs fewer steps
than static batching when output lengths differ.
"""

from __future__ import annotations

import random

import pytest
import torch

from nexus_lessons import (
    ContinuousBatcher,
    IterationLevelBatcher,
    ModelConfig,
    PagedKVCache,
    StaticBatcher,
    Transformer,
    generate,
    sample_next,
)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(3)
    m = Transformer(ModelConfig(vocab_size=71, hidden_size=32, head_dim=16, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    yield m
    torch.set_num_threads(threads)


def requests(seed=0, count=7):
    rng = random.Random(seed)
    return [(torch.randint(0, 71, (rng.randint(1, 13),)), rng.randint(1, 11), rng.randint(0, 3)) for _ in range(count)]


def expected(model, reqs):
    return [generate(model, ids[None], n)[0, len(ids):].tolist() for ids, n, _ in reqs]


def sample(logits):
    """The docs' `sample`: the next token of each row, from the last position's logits."""
    return sample_next(logits[:, -1])


@torch.no_grad()
def test_the_docs_loop_runs_as_written(model):
    reqs = requests()
    batcher = ContinuousBatcher(max_batch_size=3, max_seq_len=64, scheduling_policy="priority")
    ids = [batcher.add_request(input_ids, max_new_tokens=n, priority=p) for input_ids, n, p in reqs]
    done = {}
    while batcher.has_active_requests():
        batch = batcher.prepare_batch()
        logits = model(batch.input_ids, batch.attention_mask)
        next_tokens = sample(logits)
        completed = batcher.step(next_tokens)
        for c in completed:
            done[c.request_id] = c.output_ids.tolist()
    assert [done[i] for i in ids] == expected(model, reqs)


@torch.no_grad()
def test_iteration_level_feeds_new_tokens_and_preempts_exactly(model):
    reqs = requests(1, 9)
    cache = PagedKVCache.for_model(model, num_blocks=9, block_size=3)  # 27 slots for up to 5 x 23 tokens
    batcher = IterationLevelBatcher(max_batch_size=5, max_seq_len=64, kv_cache=cache, scheduling_policy="priority")
    ids = [batcher.add_request(x, n, p) for x, n, p in reqs]
    done, widths = {}, []
    while batcher.has_active_requests():
        batch = batcher.prepare_batch()
        widths.append(batch.input_ids.shape[1])
        logits = model(batch.input_ids, batch.attention_mask, cache=batch.cache)
        for c in batcher.step(sample(logits)):
            done[c.request_id] = c.output_ids.tolist()
        cache.check_consistent()
    assert [done[i] for i in ids] == expected(model, reqs)
    assert batcher.num_preemptions > 0 and cache.num_used_blocks == 0
    assert widths.count(1) > len(widths) // 2  # most steps feed one token per row


@torch.no_grad()
def test_static_batching_is_exact_but_takes_more_steps(model):
    reqs = requests(2, 8)
    steps = {}
    for cls in (StaticBatcher, ContinuousBatcher):
        batcher = cls(max_batch_size=4, max_seq_len=64)
        ids = [batcher.add_request(x, n) for x, n, _ in reqs]
        done = {}
        while batcher.has_active_requests():
            batch = batcher.prepare_batch()
            for c in batcher.step(model(batch.input_ids, batch.attention_mask)):  # logits: greedy
                done[c.request_id] = c.output_ids.tolist()
        assert [done[i] for i in ids] == expected(model, reqs)
        steps[cls] = batcher.num_steps
    lengths = [n for _, n, _ in reqs]
    assert steps[StaticBatcher] == max(lengths[:4]) + max(lengths[4:])
    assert steps[ContinuousBatcher] < steps[StaticBatcher]


def test_step_takes_tokens_or_logits_and_names_bad_input(model):
    b = ContinuousBatcher(max_batch_size=2, max_seq_len=8, eos_token_id=5)
    for bad in [dict(input_ids=[], max_new_tokens=2), dict(input_ids=[1], max_new_tokens=0),
                dict(input_ids=[1] * 6, max_new_tokens=3)]:
        with pytest.raises(ValueError):
            b.add_request(**bad)
    with pytest.raises(ValueError, match="scheduling_policy"):
        ContinuousBatcher(2, 8, scheduling_policy="lifo")
    with pytest.raises(RuntimeError, match="prepare_batch"):
        b.step(torch.tensor([1]))
    b.add_request([1, 2], 3)
    b.add_request([3], 3)
    b.prepare_batch()
    with pytest.raises(ValueError, match="one token per batch row"):
        b.step(torch.tensor([1, 2, 3]))
    logits = torch.zeros(2, 4, 9)
    logits[0, -1, 7] = logits[1, -1, 5] = 1.0
    (c,) = b.step(logits)  # [B, T, V] logits: the last position, greedy; row 1 hit eos
    assert c.output_ids.tolist() == [5] and c.finish_reason == "stop"
    b.prepare_batch()
    assert b.step(torch.tensor([[0, 4]])) == []  # [B, T] token ids: the last column
    b.prepare_batch()
    (c,) = b.step(torch.tensor([6]))
    assert c.output_ids.tolist() == [7, 4, 6] and c.finish_reason == "length"
    cache = PagedKVCache.for_model(model, num_blocks=4, block_size=4)
    b = ContinuousBatcher(2, 32, kv_cache=cache)
    b.add_request([1, 2, 3], 2)
    batch = b.prepare_batch()
    with pytest.raises(RuntimeError, match="cache=batch.cache"):
        b.step(model(batch.input_ids, batch.attention_mask))
