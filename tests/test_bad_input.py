"""Careless input gets a ValueError / TypeError that names the problem, before anything runs.

One test per case of COURSE.md §4 "Bad input" that torch would otherwise answer with a raw error, a
silent wrong answer or a leaked block. Each also runs the nearest valid call, so a check that refused
everything would fail here too.
"""

from __future__ import annotations

import json

import pytest
import torch

import nexus_lessons as nl
from nexus_lessons import ModelConfig, Transformer
from nexus_lessons.loading import ASSETS


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return Transformer(ModelConfig(**{**config, **overrides})).eval()


def count_forwards(model: Transformer) -> list[int]:
    """A counter of the model's forwards, to prove a check fired before the first one."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_token_ids_outside_the_vocabulary(tiny_model):
    calls = count_forwards(tiny_model)
    for ids, bad in ((torch.tensor([[5, 128, 7]]), 128), (torch.tensor([[5, -1, 7]]), -1), ([[1, 2], [3, 4, 500]], 500)):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the model's vocabulary \(0\.\.127\)"):
            nl.generate(tiny_model, ids, 3, cache="static")
    assert calls[0] == 0  # generate looked before the first forward (on a GPU the forward does not)
    with pytest.raises(ValueError, match="pad_token_id 300 is outside"):
        nl.generate(tiny_model, [[1, 2], [3]], 3, pad_token_id=300)
    with pytest.raises(ValueError, match="token id 128"):  # the forward itself checks on CPU
        tiny_model(torch.tensor([[1, 128]]), cache=nl.KVCache.for_model(tiny_model, 1, 8))
    assert nl.generate(tiny_model, torch.tensor([[0, 127]]), 2).shape == (1, 4)  # both ends of the range are fine


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "nexus-tiny")  # 8192 tokens
    nl.save_pretrained(small_model(), tmp_path, tokenizer=tok)  # a 128-token model
    with pytest.raises(ValueError, match=rf"tokenizer in .* has {len(tok)} tokens but the model's vocab_size is 128"):
        nl.load_model(tmp_path)
    model, none = nl.load_model(tmp_path, tokenizer=False)  # the weights themselves are fine
    assert none is None and model.config.vocab_size == 128


def test_config_json_missing_required_fields(tmp_path):
    nl.save_pretrained(small_model(), tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match=rf"{path} has no vocab_size"):
        nl.load_model(tmp_path, tokenizer=False)
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in ("hidden_size", "num_hidden_layers")}))
    with pytest.raises(ValueError, match="has no hidden_size, num_hidden_layers"):
        nl.load_model(tmp_path, tokenizer=False)
    path.write_text(json.dumps({**config, "vocab_size": "128"}))
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got '128'"):
        nl.load_model(tmp_path, tokenizer=False)
    path.write_text(json.dumps(config)[:-3])
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        nl.load_model(tmp_path, tokenizer=False)
    path.write_text(json.dumps(config))
    assert nl.load_model(tmp_path, tokenizer=False)[0].config.vocab_size == 128


def test_dtype_given_by_name():
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        model, _ = nl.load_model("nexus-tiny", dtype=name, tokenizer=False)
        assert model.dtype == dtype
        assert nl.KVCache.for_model(model, 1, 4).dtype == dtype
        assert nl.KVCache(2, 1, 4, 2, 8, dtype=name).dtype == dtype
        assert nl.PagedKVCache(2, 2, 8, 4, 2, dtype=name).dtype == dtype
    with pytest.raises(ValueError, match="unknown dtype 'fp16': use one of 'float32', 'float16', 'bfloat16'"):
        nl.load_model("nexus-tiny", dtype="fp16", tokenizer=False)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype .* got torch.int8"):
        nl.KVCache(2, 1, 4, 2, 8, dtype=torch.int8)


@pytest.mark.parametrize("kind", ["KVCache", "PagedKVCache"])
def test_cache_built_for_another_model_shape(tiny_model, kind):
    """tiny_model: 2 layers, 2 KV heads of dim 16. The check comes before the cache reserves anything."""
    def build(layers=2, heads=2, head_dim=16):
        if kind == "KVCache":
            return nl.KVCache(layers, 1, 16, heads, head_dim)
        return nl.PagedKVCache(layers, heads, head_dim, 4, 8)

    ids = torch.tensor([[1, 2, 3]])
    for shape, match in (({"layers": 1}, "built for 1 layers but the model has 2"),
                         ({"heads": 4}, "built for 4 KV heads but the model has 2"),
                         ({"head_dim": 8}, "built for head_dim 8 but the model has head_dim 16")):
        cache = build(**shape)
        with pytest.raises(ValueError, match=match):
            nl.generate(tiny_model, ids, 3, cache=cache)
        with pytest.raises(ValueError, match=match):
            tiny_model(ids, cache=cache)
        if kind == "KVCache":
            assert cache.seq_len == 0
        else:
            assert cache.sequences == [] and cache.num_free_blocks == cache.num_blocks
            cache.check_consistent()
    assert torch.equal(nl.generate(tiny_model, ids, 3, cache=build()), nl.generate(tiny_model, ids, 3))


def test_cuda_asked_for_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    for make in (lambda: nl.load_model("nexus-tiny", device="cuda", tokenizer=False),
                 lambda: nl.KVCache(2, 1, 4, 2, 8, device="cuda"),
                 lambda: nl.PagedKVCache(2, 2, 8, 4, 2, device="cuda:0")):
        with pytest.raises(ValueError, match="no CUDA device is available.*use device='cpu'"):
            make()
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        nl.load_model("nexus-tiny", device="gpu", tokenizer=False)
    assert nl.load_model("nexus-tiny", device="cpu", tokenizer=False)[0].device.type == "cpu"


def test_prompt_past_max_position_embeddings():
    model = small_model(max_position_embeddings=32)
    calls = count_forwards(model)
    prompt = torch.arange(1, 31)[None]  # 30 tokens
    for cache in (None, "static", "paged"):
        with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_new_tokens \(3\) = 33 .* "
                                             r"max_position_embeddings \(32\)"):
            nl.generate(model, prompt, 3, cache=cache)
    assert calls[0] == 0
    assert nl.generate(model, prompt, 2, cache="static").shape == (1, 32)  # exactly the limit is fine
    # Left padding does not count: the longest real row is what reaches the limit.
    ids, mask = nl.left_pad([[1] * 31, [2] * 5], device="cpu")
    wide = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids], 1), torch.cat([torch.zeros(2, 4, dtype=torch.long), mask], 1)
    assert nl.generate(model, wide[0], 1, attention_mask=wide[1]).shape == (2, 36)
    # The forward refuses too: a long prompt, and a cached decode step past the limit.
    with pytest.raises(ValueError, match="33 tokens are past the model's max_position_embeddings"):
        model(torch.ones(1, 33, dtype=torch.long))
    cache = nl.KVCache.for_model(model, 1, 64)
    model(torch.ones(1, 32, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="reaches 33 tokens, past the model's max_position_embeddings"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_paged_pool_too_small_fails_before_the_first_forward(tiny_model):
    calls = count_forwards(tiny_model)
    cache = nl.PagedKVCache.for_model(tiny_model, num_blocks=3, block_size=4)
    prompt = torch.arange(1, 6)[None]  # 5 tokens + 12 new: 16 fed back, 4 blocks
    with pytest.raises(nl.OutOfBlocksError, match="4 needed .* but only 3 of 3 are free"):
        nl.generate(tiny_model, prompt, 12, cache=cache)
    assert calls[0] == 0
    cache.check_consistent()
    assert cache.num_free_blocks == 3 and cache.sequences == []
    # The bound is exact: 5 + 8 new = 12 fed back fills the 3 blocks, and padding takes no block
    # (rows of 5 and 1 real tokens + 3 new: 2 + 1 blocks).
    assert torch.equal(nl.generate(tiny_model, prompt, 8, cache=cache), nl.generate(tiny_model, prompt, 8))
    ragged = [[1, 2, 3, 4, 5], [6]]
    assert torch.equal(nl.generate(tiny_model, ragged, 4, cache=cache), nl.generate(tiny_model, ragged, 4))
    cache.check_consistent()
