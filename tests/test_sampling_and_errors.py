"""Sampling against transformers' logits processors and the target distribution; bad input fails loudly."""

from __future__ import annotations

import pytest
import torch

import nexus_lessons as nl
from nexus_lessons.sampling import logits_to_probs, sample_next


@pytest.mark.parametrize("top_k,top_p,temperature", [(None, None, 0.7), (5, None, 1.0), (None, 0.8, 1.3),
                                                     (20, 0.5, 0.9), (1, None, 1.0), (None, 1e-6, 1.0)])
def test_filters_match_transformers(top_k, top_p, temperature):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(logits_to_probs(logits, temperature, top_k, top_p), torch.softmax(ref, -1))


def test_samples_follow_the_target_distribution():
    """Chi-square goodness of fit of 40k draws against the filtered distribution."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(1)) * 2
    probs = logits_to_probs(logits, 0.8, top_k=8, top_p=0.95)[0]
    g = torch.Generator().manual_seed(2)
    n = 40_000
    draws = torch.stack([sample_next(logits.expand(1000, -1), 0.8, 8, 0.95, g) for _ in range(n // 1000)])
    counts = torch.bincount(draws.flatten(), minlength=12).double()
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    keep = probs > 0
    expected = probs[keep].double() * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi2 {chi2:.1f} with {dof} degrees of freedom"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_model):
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    a = nl.generate(tiny_model, ids, 15, cache="static", temperature=1.0, generator=torch.Generator().manual_seed(4))
    b = nl.generate(tiny_model, ids, 15, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)  # the cache changes nothing, sampling included
    greedy = nl.generate(tiny_model, ids, 15)
    assert torch.equal(nl.generate(tiny_model, ids, 15, temperature=2.0, top_k=1), greedy)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
])
def test_bad_generation_arguments(tiny_model, kwargs, match):
    ids = torch.tensor([[1, 2, 3]])
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        nl.generate(tiny_model, ids, args.pop("max_new_tokens"), **args)


def test_empty_prompt(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        nl.generate(tiny_model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="empty"):
        nl.generate(tiny_model, [[1, 2], []], 3)


def test_prompt_longer_than_cache(tiny_model):
    cache = nl.KVCache.for_model(tiny_model, 1, 8)
    with pytest.raises(ValueError, match="max_seq_len"):
        nl.generate(tiny_model, torch.arange(6)[None], 5, cache=cache)
    with pytest.raises(nl.CacheFullError, match="max_seq_len"):
        tiny_model(torch.arange(9)[None], cache=cache)


def test_batch_larger_than_cache(tiny_model):
    cache = nl.KVCache.for_model(tiny_model, 2, 16)
    with pytest.raises(ValueError, match="max_batch_size"):
        nl.generate(tiny_model, torch.ones(3, 4, dtype=torch.long), 2, cache=cache)


def test_wrong_dtype_and_device(tiny_model):
    with pytest.raises(TypeError, match="dtype"):
        tiny_model(torch.ones(1, 3))  # float ids
    cache = nl.KVCache(2, 1, 16, 2, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16"):
        nl.generate(tiny_model, torch.ones(1, 3, dtype=torch.long), 2, cache=cache)
    with pytest.raises(ValueError, match="meta"):
        nl.generate(tiny_model, torch.ones(1, 3, dtype=torch.long, device="meta"), 2)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'llama-7b'"):
        nl.load_model("llama-7b")


def test_bad_cache_shape():
    with pytest.raises(ValueError, match="max_seq_len"):
        nl.KVCache(2, 1, 0, 2, 16)
