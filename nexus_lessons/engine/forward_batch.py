"""The model's cache protocol for one engine step, over the PagedKVCache's pools (the one copy of K/V).

The runner packs every scheduled token of a step into one row, `input_ids [1, N]`: first the sequences
that feed one token (decodes), then the multi-token chunks (prefills), and fills the metadata tensors
below. The model then calls, per layer, `attend_unrotated(layer, q, k, v, cos, sin)`: one kernel rotates
q and k and writes k, v into their slots (`kernels.rope`), then the decode rows attend through
`paged_decode_attention` and the chunks through the varlen `paged_prefill_attention` (lesson 02).

Nothing here reads a tensor back to the host: the metadata are device tensors, and the host numbers
(`max_query_len`, `max_context_len`) are fixed at set() time. So a decode step built on it can be
recorded in a CUDA graph and replayed after the runner has written the next step's metadata into the
same tensors.

Quantized pools (lesson 03, `kv_cache_dtype="int8" | "fp8" | "int4"`): the model rotates q and k itself
and calls `attend`; K/V are quantized as they are written (`quant.write`) and read back by the decode
and extend kernels that dequantize in registers. int4 also needs the step's plan of tail slots
(`QuantizedPool.plan`, built on the host by the runner), so its steps run eagerly; int8 and fp8 decode
steps are captured in CUDA graphs like plain ones.
"""

from __future__ import annotations

import torch

from ..kernels import paged_decode_attention, paged_prefill_attention
from ..kernels.quant import quant_decode_attention, quant_extend_attention
from ..kernels.rope import rope_and_cache
from ..paged import PagedKVCache


class ForwardBatch:
    fuses_rope = True  # the model hands over q/k/v before RoPE (see model.Attention.attend)

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        H, D = cache.num_heads, cache.head_dim
        # Each layer's pool as token slots [num_blocks * block_size, Hkv, D]: views, not copies.
        self.k_slots = [cache.k[layer].view(-1, H, D) for layer in range(cache.num_layers)]
        self.v_slots = [cache.v[layer].view(-1, H, D) for layer in range(cache.num_layers)]
        self.validate = cache.device.type != "cuda"  # value checks read tensors back: only off the GPU
        self.fuses_rope = cache.quant is None  # quantized pools: the model rotates, `attend` quantizes
        self.quant_plan = None

    def set(self, *, positions: torch.Tensor, slot_mapping: torch.Tensor, num_decode: int,
            block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor | None = None,
            max_query_len: int = 1, max_context_len: int | None = None, mean_context_len: float | None = None,
            quant_plan=None) -> None:
        """positions, slot_mapping [N] int64; block_tables [B, W] and context_lens [B] int32 for the B rows
        (decode rows first); query_start_loc [B - num_decode + 1] int32, offsets of the chunks' tokens
        after the decode tokens. `max_context_len` None (graphs): the table width fixes the split plan."""
        self.positions, self.slot_mapping, self.num_decode = positions, slot_mapping, num_decode
        self.block_tables, self.context_lens, self.query_start_loc = block_tables, context_lens, query_start_loc
        self.max_query_len, self.max_context_len, self.mean_context_len = max_query_len, max_context_len, mean_context_len
        self.quant_plan = quant_plan  # int4's QuantPlan for this step (rows in the batch's order)

    def begin_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None or input_ids.shape != (1, self.positions.shape[0]):
            raise ValueError(f"an engine step is one packed row of {self.positions.shape[0]} tokens without a mask, "
                             f"got input_ids {tuple(input_ids.shape)}")
        return self.positions[None]

    def attend_unrotated(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q [1, N, Hq*D], k/v [1, N, Hkv*D] before RoPE, cos/sin [1, N, D] -> [1, Hq, N, D]."""
        q = rope_and_cache(q[0], k[0], v[0], cos[0], sin[0], self.k_slots[layer], self.v_slots[layer],
                           self.slot_mapping)  # [N, Hq, D], rotated; k, v now in their slots
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        nd, bt, lens = self.num_decode, self.block_tables, self.context_lens
        parts = []
        if nd:
            parts.append(paged_decode_attention(
                q[:nd], k_pool, v_pool, bt[:nd], lens[:nd], max_context_len=self.max_context_len,
                mean_context_len=self.mean_context_len, validate=self.validate))
        if nd < q.shape[0]:
            parts.append(paged_prefill_attention(
                q[nd:], k_pool, v_pool, bt[nd:], lens[nd:], self.query_start_loc,
                max_query_len=self.max_query_len, validate=self.validate))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.transpose(0, 1)[None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Quantized pools: q [1, Hq, N, D], k/v [1, Hkv, N, D] after RoPE -> [1, Hq, N, D]."""
        quant, plan, check = self.cache.quant, self.quant_plan, self.validate
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [N, H, D]
        quant.write(layer, k, v, self.slot_mapping, plan, check)
        kv = quant.layer(layer)
        nd, bt, lens = self.num_decode, self.block_tables, self.context_lens
        tails = None if plan is None else plan.tail_slots
        parts = []
        if nd:
            parts.append(quant_decode_attention(
                q[:nd], kv, bt[:nd], lens[:nd], tail_slots=None if tails is None else tails[:nd],
                max_context_len=self.max_context_len, validate=check))
        if nd < q.shape[0]:
            parts.append(quant_extend_attention(
                q[nd:], kv, bt[nd:], lens[nd:], self.query_start_loc, k[nd:], v[nd:],
                tail_slots=None if tails is None else tails[nd:], max_query_len=self.max_query_len, validate=check))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.transpose(0, 1)[None]
