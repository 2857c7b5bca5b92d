"""Autoregressive generation: the recompute baseline and the cached loop, one function.

`cache=None` re-runs the model over the whole sequence for every new token (O(T^2) work per token
in attention, O(T) in the MLPs). With a cache, the prompt is run once (prefill) and every later step
feeds only the newest token (decode).
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .kv_cache import DynamicKVCache, KVCache
from .sampling import sample_next, validate_sampling


def left_pad(prompts: Sequence[Sequence[int]] | Sequence[torch.Tensor], pad_token_id: int = 0,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> (input_ids [B, T], attention_mask [B, T]), padded on the left like transformers."""
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("empty prompt: every prompt needs at least one token")
    T = max(r.numel() for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - r.numel():] = r
        mask[i, T - r.numel():] = 1
    return ids.to(device), mask.to(device)


def _as_batch(model, input_ids, attention_mask, pad_token_id, max_new_tokens: int = 0):
    """The prompt as (input_ids [B, T], attention_mask or None), checked once per call: the ids against
    the vocabulary (read back even from a GPU, where the forward does not look) and the longest row plus
    `max_new_tokens` against max_position_embeddings, before anything runs."""
    if isinstance(input_ids, (list, tuple)) and input_ids and not isinstance(input_ids[0], int):
        input_ids, attention_mask = left_pad(input_ids, pad_token_id, model.device)
    elif isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor(input_ids, dtype=torch.long, device=model.device)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor or a list of token-id lists, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids has no tokens")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    model._check_input(input_ids, attention_mask, read_ids=False)
    longest = input_ids.shape[1]
    if attention_mask is not None:
        real = attention_mask.bool().sum(1)
        if not bool((real > 0).all()):
            raise ValueError("empty prompt: a row of attention_mask has no real token")
        longest = int(real.max())
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens}"
                         f" is past the model's max_position_embeddings ({limit})")
    model._check_token_ids(input_ids)
    return input_ids, attention_mask


def make_cache(kind: str, model, batch_size: int, max_seq_len: int, block_size: int = 16):
    """Build a cache by name, sized for `batch_size` sequences of `max_seq_len` tokens: "static"
    (preallocated `KVCache`), "dynamic" (`DynamicKVCache`) or "paged" (`PagedKVCache`, lesson 02)."""
    if kind == "static":
        return KVCache.for_model(model, batch_size, max_seq_len)
    if kind == "dynamic":
        return DynamicKVCache()
    if kind == "paged":
        from .paged import PagedKVCache

        return PagedKVCache.for_model(model, batch_size * -(-max_seq_len // block_size), block_size)
    raise ValueError(f"unknown cache kind {kind!r}: use 'static', 'dynamic', 'paged' or a cache object")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens; returns LongTensor [B, T + n], prompt included.

    `input_ids` is [B, T] (left-padded, with `attention_mask`, like transformers), [T], or a list of
    token-id lists of any lengths (padded here). `cache` is None (recompute everything each step),
    "static", "dynamic", "paged", or a cache object (reset here, then filled). Rows that emit an eos token are
    padded with `pad_token_id` (default: the first eos id) until every row is done, like transformers.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    validate_sampling(temperature, top_k, top_p)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if not 0 <= pad < model.config.vocab_size:
        given = "pad_token_id" if pad_token_id is not None else "pad_token_id (by default the first eos_token_id)"
        raise ValueError(f"{given} {pad} is outside the model's vocabulary (0..{model.config.vocab_size - 1})")
    input_ids, attention_mask = _as_batch(model, input_ids, attention_mask, pad, max_new_tokens)
    B, T = input_ids.shape
    if max_new_tokens == 0:
        return input_ids.clone()

    if isinstance(cache, str):
        cache = make_cache(cache, model, B, T + max_new_tokens)
    if cache is not None:
        capacity = getattr(cache, "max_seq_len", None)
        if capacity is not None and T + max_new_tokens - 1 > capacity:
            raise ValueError(
                f"prompt ({T}) + max_new_tokens ({max_new_tokens}) - 1 = {T + max_new_tokens - 1} tokens "
                f"exceed the cache's max_seq_len {capacity}"
            )
        cache.reset()
        check_capacity = getattr(cache, "check_capacity", None)  # a paged pool: the whole request must fit
        if check_capacity is not None:
            real = [T] * B if attention_mask is None else attention_mask.bool().sum(1).tolist()
            check_capacity([n + max_new_tokens - 1 for n in real])  # the last new token is never fed back

    eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, mask = input_ids, attention_mask
    step_input, first_mask, prompts = input_ids, attention_mask, None
    if getattr(cache, "prefix_cache", None) is not None:  # lesson 04: feed only what is not cached
        step_input, first_mask, prompts = _reuse_cached_prefixes(cache, input_ids, attention_mask, pad)
    first_input = step_input
    for _ in tqdm(range(max_new_tokens), disable=not progress, desc="generate", leave=False):
        if cache is None:
            logits = model(tokens, attention_mask=mask)[:, -1]
        else:
            step_mask = first_mask if step_input is first_input else None
            logits = model(step_input, cache=cache, attention_mask=step_mask)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos:
            done |= torch.isin(nxt, eos_t)
            if bool(done.all()):
                break
        step_input = nxt[:, None]
    if prompts is not None:  # finished: each row's blocks stay cached for the next request
        for seq_id, prompt, new in zip(cache.rows, prompts, tokens[:, T:].tolist()):
            cache.free(seq_id, prompt + new)
        cache.bind(None)
    return tokens


def _reuse_cached_prefixes(cache, input_ids, attention_mask, pad_token_id):
    """One sequence per row, each starting from the longest cached prefix of its prompt. Returns the
    first step's input (the rest of each prompt, left-padded), its mask, and the prompts as lists
    (read from the device once, here; generated ids are read once at the end)."""
    rows = input_ids.tolist()
    if attention_mask is not None:
        rows = [[t for t, m in zip(r, ms) if m] for r, ms in zip(rows, attention_mask.tolist())]
    seqs = [cache.add_sequence(r) for r in rows]
    cache.bind(seqs)
    rest = [r[cache.num_tokens(s):] for r, s in zip(rows, seqs)]
    ids, mask = left_pad(rest, pad_token_id, input_ids.device)
    return ids, (None if len({len(r) for r in rest}) == 1 else mask), rows
