"""Reference solutions to the exercises of lesson 01 (`course/01_kv_cache.ipynb`).

Each function has the name and signature of the notebook's stub; `nexus_lessons.exercises.lesson01`
holds the checkers. `MISTAKES` collects plausible wrong answers, one list per exercise: the tests prove
every checker rejects them (and they are the lesson's "common pitfalls", written as code).
"""

from __future__ import annotations

import math

import torch

from nexus_lessons import KVCache


def kv_cache_bytes(num_layers, seq_len, num_kv_heads, head_dim, bytes_per_elem, batch=1):
    """Bytes a KV cache needs: batch x layers x tokens x (K and V) x KV heads x head_dim x bytes."""
    return batch * num_layers * seq_len * 2 * num_kv_heads * head_dim * bytes_per_elem


def attend_with_cache(k_cache, v_cache, q, k, v):
    """One head of one layer. k_cache, v_cache [T_past, d]; q, k, v [T_new, d] for the new tokens.

    Returns (out [T_new, d], k_cache [T_past + T_new, d], v_cache [T_past + T_new, d]).
    """
    k_cache = torch.cat([k_cache, k], dim=0)
    v_cache = torch.cat([v_cache, v], dim=0)
    past, new = k_cache.shape[0] - q.shape[0], q.shape[0]
    scores = q @ k_cache.T / math.sqrt(q.shape[-1])  # [T_new, T_past + T_new]
    # New token i sits at position past + i and may see keys 0 .. past + i.
    future = torch.arange(past + new)[None, :] > (past + torch.arange(new))[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


def static_append(k_buf, v_buf, length, k, v):
    """Write k, v [T_new, d] into the preallocated k_buf, v_buf [max_len, d] at slots length.. ; return the new length."""
    new = k.shape[0]
    if length + new > k_buf.shape[0]:
        raise ValueError(f"cache full: {length} slots used, {new} new, capacity {k_buf.shape[0]}")
    k_buf[length:length + new] = k
    v_buf[length:length + new] = v
    return length + new


@torch.inference_mode()
def my_generate(model, input_ids, max_new_tokens):
    """Greedy generation with a static KVCache: prefill the prompt once, then feed one token per step."""
    B, T = input_ids.shape
    cache = KVCache.for_model(model, B, T + max_new_tokens)
    logits = model(input_ids, cache=cache)  # prefill: every prompt token's K/V goes into the cache
    tokens = [input_ids]
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        tokens.append(nxt)
        if step + 1 < max_new_tokens:
            logits = model(nxt, cache=cache)  # decode: only the new token; the cache supplies the rest
    return torch.cat(tokens, dim=1)


# --- wrong answers the checkers must catch ----------------------------------------------------------------


def kv_cache_bytes_forgets_v(num_layers, seq_len, num_kv_heads, head_dim, bytes_per_elem, batch=1):
    """Counts K only."""
    return batch * num_layers * seq_len * num_kv_heads * head_dim * bytes_per_elem


def kv_cache_bytes_forgets_batch(num_layers, seq_len, num_kv_heads, head_dim, bytes_per_elem, batch=1):
    """One sequence's cache, whatever the batch."""
    return num_layers * seq_len * 2 * num_kv_heads * head_dim * bytes_per_elem


def kv_cache_bytes_bits(num_layers, seq_len, num_kv_heads, head_dim, bytes_per_elem, batch=1):
    """Multiplies by 8 as if the answer were in bits."""
    return 8 * batch * num_layers * seq_len * 2 * num_kv_heads * head_dim * bytes_per_elem


def attend_with_cache_no_mask(k_cache, v_cache, q, k, v):
    """Right for one new token; lets new tokens see each other's future when several arrive at once."""
    k_cache, v_cache = torch.cat([k_cache, k]), torch.cat([v_cache, v])
    return torch.softmax(q @ k_cache.T / math.sqrt(q.shape[-1]), dim=-1) @ v_cache, k_cache, v_cache


def attend_with_cache_mask_from_zero(k_cache, v_cache, q, k, v):
    """The causal mask of a full forward, not shifted by the cache length."""
    k_cache, v_cache = torch.cat([k_cache, k]), torch.cat([v_cache, v])
    new, total = q.shape[0], k_cache.shape[0]
    future = torch.arange(total)[None, :] > torch.arange(new)[:, None]
    scores = (q @ k_cache.T / math.sqrt(q.shape[-1])).masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


def attend_with_cache_no_append(k_cache, v_cache, q, k, v):
    """Attends correctly but returns the old cache, so the next step forgets these tokens."""
    out, _, _ = attend_with_cache(k_cache, v_cache, q, k, v)
    return out, k_cache, v_cache


def static_append_from_zero(k_buf, v_buf, length, k, v):
    """Always writes at slot 0."""
    k_buf[: k.shape[0]] = k
    v_buf[: v.shape[0]] = v
    return length + k.shape[0]


def static_append_truncates(k_buf, v_buf, length, k, v):
    """Silently drops what does not fit."""
    n = min(k.shape[0], k_buf.shape[0] - length)
    k_buf[length:length + n] = k[:n]
    v_buf[length:length + n] = v[:n]
    return length + n


def static_append_no_room_check(k_buf, v_buf, length, k, v):
    """Writes without checking the room: past the end torch raises a shape error, not a ValueError that says
    the cache is full."""
    new = k.shape[0]
    k_buf[length:length + new] = k
    v_buf[length:length + new] = v
    return length + new


def static_append_forgets_length(k_buf, v_buf, length, k, v):
    """Writes correctly but returns the old length."""
    static_append(k_buf, v_buf, length, k, v)
    return length


@torch.inference_mode()
def my_generate_recompute(model, input_ids, max_new_tokens):
    """Right tokens, no cache: the whole sequence goes through the model every step."""
    tokens = input_ids
    for _ in range(max_new_tokens):
        nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


@torch.inference_mode()
def my_generate_new_cache_each_step(model, input_ids, max_new_tokens):
    """Feeds one token per step but into a fresh cache, so the model forgets the prompt."""
    B, T = input_ids.shape
    logits = model(input_ids, cache=KVCache.for_model(model, B, T + max_new_tokens))
    tokens = [input_ids]
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = model(nxt, cache=KVCache.for_model(model, B, T + max_new_tokens))
    return torch.cat(tokens, dim=1)


@torch.inference_mode()
def my_generate_drops_prompt(model, input_ids, max_new_tokens):
    """Returns only the new tokens (transformers and `generate` return the prompt too)."""
    return my_generate(model, input_ids, max_new_tokens)[:, input_ids.shape[1]:]


MISTAKES = {
    "kv_cache_bytes": [kv_cache_bytes_forgets_v, kv_cache_bytes_forgets_batch, kv_cache_bytes_bits],
    "attend_with_cache": [attend_with_cache_no_mask, attend_with_cache_mask_from_zero, attend_with_cache_no_append],
    "static_append": [static_append_from_zero, static_append_truncates, static_append_no_room_check,
                      static_append_forgets_length],
    "my_generate": [my_generate_recompute, my_generate_new_cache_each_step, my_generate_drops_prompt],
}
