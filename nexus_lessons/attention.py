"""Attention as plain PyTorch: the mask rules every cache shares, and the no-cache baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(query_slots: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: query t may see key j when j <= its own slot and key j is real.

    `query_slots[b, t]` is the index, along the key axis, where query t's own key sits.
    `key_valid[b, j]` is False for padding and for slots not yet written. A padding query still sees
    itself, so no row is fully masked (that would give NaN, and NaN x 0 leaks into real rows).
    """
    S = key_valid.shape[-1]
    j = torch.arange(S, device=key_valid.device)
    slots = query_slots[:, :, None]
    allowed = (j <= slots) & key_valid[:, None, :]
    allowed |= j == slots
    return allowed[:, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads. q [B, Hq, T, D]; k, v [B, Hkv, S, D]."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, for lessons and references (any float dtype)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
