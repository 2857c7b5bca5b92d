"""The shapes of `nexus-tiny` and `nexus-tiny-draft`, the toy shapes for tests, and the cost rules.

The draft's budget is in layers: at these sizes a batch-1 forward costs about its number of layers
(kernel launches and per-layer work; a 256-wide layer is no slower than a 128-wide one), so the draft
may have at most MAX_DRAFT_LAYERS, at any width. FLOPs per generated token, 2 x (non-embedding
parameters + lm_head parameters), are still reported: they are the cost once a model is large enough to
be bound by reading its weights. The shipped files must fit ASSET_BUDGET_BYTES together.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig

EOS_ID = 0  # `<|endoftext|>` is the first token the BPE trainer adds
TRAIN_CONTEXT = 1024
MAX_DRAFT_LAYERS = 2
ASSET_BUDGET_BYTES = 24 * 2**20  # everything under nexus_lessons/assets

# SwiGLU 752 rather than 768: keeps model.safetensors in bf16 under 16 MiB (the GPU machine returns
# files of at most 16 MiB), at 8.29M parameters.
TARGET_CONFIG = ModelConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=752, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)

# One layer of the target's own shape (`tiny.distill` starts it as the target's embedding, first layer and
# final norm, then trains it on the target's distributions): 2.87M parameters, 5.7 MB in bf16.
DRAFT_CONFIG = replace(TARGET_CONFIG, num_hidden_layers=1)

# Toy shapes for the CPU test: seconds, not minutes. Same vocabulary as the real tokenizer.
TOY_TARGET_CONFIG = replace(TARGET_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=None)
TOY_DRAFT_CONFIG = replace(TARGET_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=None)


def non_embedding_params(config: ModelConfig) -> int:
    """Parameters outside the input embedding and lm_head (attention, MLP, norms)."""
    untied_head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_parameters - config.vocab_size * config.hidden_size - untied_head


def flops_per_token(config: ModelConfig) -> int:
    """2 x (non-embedding params + lm_head params): one multiply-add per weight the token passes through."""
    return 2 * (non_embedding_params(config) + config.vocab_size * config.hidden_size)


def cost_report(target: ModelConfig, draft: ModelConfig) -> dict[str, float | int]:
    t, d = flops_per_token(target), flops_per_token(draft)
    return {
        "target_params": target.num_parameters, "draft_params": draft.num_parameters,
        "target_non_embedding_params": non_embedding_params(target),
        "draft_non_embedding_params": non_embedding_params(draft),
        "target_flops_per_token": t, "draft_flops_per_token": d,
        "target_over_draft_cost": t / d,
    }


def check_draft_budget(target: ModelConfig, draft: ModelConfig) -> None:
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft vocab {draft.vocab_size} != target vocab {target.vocab_size}: they share a tokenizer")
    if draft.num_hidden_layers > MAX_DRAFT_LAYERS:
        raise ValueError(f"draft has {draft.num_hidden_layers} layers; the budget is {MAX_DRAFT_LAYERS}")
