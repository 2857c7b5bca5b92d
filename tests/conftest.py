"""Shared fixtures: small random-init models of each supported family, with peaked logits.

Random init at the usual 0.02 gives nearly flat logits, where float rounding can flip a greedy argmax
between two equally valid implementations. A wider init (0.2) makes the top token clear, so token-for-
token equality tests compare implementations, not rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


def hf_config(family: str, *, tie: bool, vocab: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              hidden: int = 64, inter: int = 128, init: float = 0.2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  initializer_range=init, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(family)


def hf_model(family: str, *, tie: bool, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, tie=tie, **kw)).eval()
    model.generation_config.eos_token_id = None  # compare full lengths; eos is tested separately
    return model


FAMILIES = [("llama", True), ("llama", False), ("qwen2", False), ("qwen2", True), ("mistral", False)]


@pytest.fixture(params=FAMILIES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in FAMILIES])
def hf_and_ours(request):
    from nexus_lessons import from_hf

    family, tie = request.param
    hf = hf_model(family, tie=tie)
    return hf, from_hf(hf)


@pytest.fixture
def tiny_model():
    """Our own small GQA model, random weights with peaked logits."""
    from nexus_lessons import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def interpreted():
    """Run a script in a fresh process with TRITON_INTERPRET=1 (set before triton loads); it must print ok."""
    def run(code: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]

    return run
