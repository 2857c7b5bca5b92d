"""Plain-PyTorch references for the paged-attention kernels: same signatures, written to be read.

Layout (vLLM's): the cache is a pool of fixed-size blocks, ``k_cache, v_cache [num_blocks, block_size,
Hkv, D]``. Sequence ``b`` owns the blocks listed in ``block_tables[b]``; its token ``t`` lives in block
``block_tables[b, t // block_size]`` at offset ``t % block_size``. A *slot* is the flat index
``block * block_size + offset``.

These functions loop over sequences and gather each one's keys and values into a contiguous tensor,
then do textbook softmax attention in float32. They are slow and obviously right; the Triton kernels in
``write.py``, ``decode.py`` (with ``decode_streamk.py``) and ``extend.py`` must agree with them. No argument checking here: the public functions in
``dispatch.py`` check once, then call either side.
"""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, contiguous: [length, Hkv, D].

    ``cache`` is [num_blocks, block_size, Hkv, D]; ``block_table`` is that sequence's row of the table.
    """
    block_size = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table.to(device=cache.device, dtype=torch.long)[positions // block_size]
    return cache[blocks, positions % block_size]


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values ``[N, Hkv, D]`` into their slots (in place); slot -1 means "skip this row"."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale) v in float32 for one sequence with grouped KV heads.

    q [T, Hq, D]; k, v [S, Hkv, D]; visible [T, S] bool or None -> [T, Hq, D] float32.
    """
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, T, D]
    kf = k.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, S, D]
    vf = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = (qf @ kf.transpose(1, 2)) * scale  # [Hq, T, S]
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).transpose(0, 1)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One new query token per sequence against its whole paged context. q [B, Hq, D] -> [B, Hq, D].

    The query is the last of the ``context_lens[b]`` tokens, so it sees all of them (no mask).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = gather_kv(k_cache, block_tables[b], length)
        v = gather_kv(v_cache, block_tables[b], length)
        out[b] = _attend(q[b : b + 1], k, v, scale, None)[0].to(q.dtype)
    return out


def prefill_visibility(
    q_len: int, context_len: int, custom_mask: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Which keys each new token sees: bool [q_len, context_len].

    The new tokens are the last ``q_len`` of ``context_len``; every cached token before them is visible.
    Among the new tokens the rule is causal, or ``custom_mask[i, j]`` (new token i sees new token j) when
    given, e.g. a speculative-decoding tree where a node sees only its ancestors.
    """
    prefix = context_len - q_len
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(context_len, device=device)[None, :]
    if custom_mask is None:
        return j <= prefix + i
    visible = (j < prefix).expand(q_len, context_len).clone()
    visible[:, prefix:] = custom_mask[:, :q_len].to(device=device, dtype=torch.bool)
    return visible


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
    custom_mask: torch.Tensor | None = None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many new tokens per sequence ("extend"), packed varlen. q [total_q, Hq, D] -> [total_q, Hq, D].

    Sequence b's queries are rows ``query_start_loc[b]:query_start_loc[b+1]`` of q and are the last
    ``q_len_b`` of its ``context_lens[b]`` tokens (their K/V are already in the cache). Causal among
    themselves, or ``custom_mask [total_q, >= max q_len]`` bool: row r (a query) may see new token j of
    its own sequence when ``custom_mask[r, j]``; cached tokens are always visible.
    ``k_new, v_new [total_q, Hkv, D]`` (packed like q): the new tokens' K/V, read from there instead of
    from the cache (only the cached prefix is gathered from the pages).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, length in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        if k_new is None:
            k = gather_kv(k_cache, block_tables[b], length)
            v = gather_kv(v_cache, block_tables[b], length)
        else:  # the cached prefix from the pages, then the new tokens' own rows
            prefix = length - (hi - lo)
            k = torch.cat([gather_kv(k_cache, block_tables[b], prefix), k_new[lo:hi]])
            v = torch.cat([gather_kv(v_cache, block_tables[b], prefix), v_new[lo:hi]])
        rows = None if custom_mask is None else custom_mask[lo:hi]
        visible = prefill_visibility(hi - lo, length, rows, device=q.device)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, visible).to(q.dtype)
    return out
