"""The shapes of `nexus-tiny` and `nexus-tiny-draft`, the toy shapes for tests, and the cost rule.

Cost is counted as matmul FLOPs per generated token, 2 x (non-embedding parameters + lm_head
parameters): the input embedding is a table lookup, the output projection is a real matmul (and with a
vocabulary of 8192 it dominates a small draft). Attention over the context is left out (it is the same
order for both models at short contexts and is not what the budget is about).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig

EOS_ID = 0  # `<|endoftext|>` is the first token the BPE trainer adds
TRAIN_CONTEXT = 1024
MAX_DRAFT_COST_RATIO = 1 / 6

# SwiGLU 752 rather than 768: keeps model.safetensors in bf16 under 16 MiB (the GPU machine returns
# files of at most 16 MiB), at 8.29M parameters.
TARGET_CONFIG = ModelConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=752, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)

# Two layers (one is not enough for induction heads, i.e. copying names seen earlier in the file),
# hidden 128 (the lm_head alone is 8192 x 128 = 1.05M of the ~1.38M budget), GQA 4/2, SwiGLU 304:
# the largest 2-layer shape of hidden 128 that stays under 1/6 of the target's cost (6.006x).
DRAFT_CONFIG = replace(TARGET_CONFIG, hidden_size=128, intermediate_size=304, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=None)

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
    ratio = flops_per_token(draft) / flops_per_token(target)
    if ratio > MAX_DRAFT_COST_RATIO:
        raise ValueError(f"draft costs {ratio:.3f} of the target per token; the budget is {MAX_DRAFT_COST_RATIO:.3f}")
