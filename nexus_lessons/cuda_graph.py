"""Batch-1-fast decoding: a static cache whose decode step keeps all its state on the device, replayed
as one CUDA graph per token (optionally after torch.compile has fused the small ops).

At batch 1 a decode step is a few hundred tiny kernels; launched one by one from Python, the GPU
spends most of its time waiting for the CPU. A CUDA graph records the whole step once and replays it
with a single launch. To be recordable, nothing in the step may depend on a Python value that changes
between tokens: the write slot, the RoPE positions and the attention mask all live in device tensors,
and the step advances them itself. Attention then runs over the whole `max_seq_len` buffer with a mask
(the shape is fixed), which costs reading the unused part of the cache: keep `max_seq_len` tight.
"""

from __future__ import annotations

import torch

from .generate import _as_batch
from .kv_cache import KVCache


@torch.library.custom_op("nexus_lessons::graph_paged_decode", mutates_args=())
def graph_paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, max_context_len: int) -> torch.Tensor:
    """Lesson 02's paged decode attention as one opaque op: the compiler keeps it whole, and its launch
    (no value checks, no host reads) records into a CUDA graph."""
    from .kernels import paged_decode_attention

    return paged_decode_attention(q.contiguous(), k_pages, v_pages, block_tables, context_lens,
                                  max_context_len=max_context_len, validate=False)


@graph_paged_decode.register_fake
def _(q, k_pages, v_pages, block_tables, context_lens, max_context_len):
    return torch.empty_like(q)


def argmax_two_stage(logits: torch.Tensor, chunks: int = 128) -> torch.Tensor:
    """``logits.argmax(-1, keepdim=True)`` for [B, V] logits, as two reductions.

    Compiled as one, a single row's argmax over a 32k vocabulary is one program reading 64 KB alone
    (about 15 us on an H200). Split into `chunks` rows first, the reads spread over the GPU. Ties keep
    the first index, as argmax does: the first maximum of the first chunk holding the maximum.
    """
    B, V = logits.shape
    while chunks > 1 and V % chunks:
        chunks //= 2
    vals, idx = logits.view(B, chunks, V // chunks).max(-1)
    best = vals.argmax(-1, keepdim=True)
    return best * (V // chunks) + idx.gather(-1, best)


class GraphKVCache(KVCache):
    """A `KVCache` whose T=1 steps use device-side positions, so they can be captured in a CUDA graph.

    Prefill (T > 1) runs eagerly through `KVCache`; `sync_to_device()` then hands the state to the
    device tensors, and every decode step must be followed by `advance()` (the decoder does both).
    `attention="paged"` keeps decode K/V in pages read by lesson 02's kernel; `fused_rope=True` then
    takes q/k/v before RoPE and rotates them in the kernel that writes the page slot (`kernels.rope`).
    """

    def __init__(self, *args, attention: str = "sdpa", fused_rope: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if attention not in ("sdpa", "paged"):
            raise ValueError(f"attention must be 'sdpa' or 'paged', got {attention!r}")
        if fused_rope and attention != "paged":
            raise ValueError("fused_rope writes the paged layout: it needs attention='paged'")
        self.attention = attention
        self.fused_rope = fused_rope
        # One tensor per layer rather than views of one [L, ...] tensor: under torch.compile an in-place
        # write into a view is functionalised into a copy of the whole base tensor, every step.
        self.k = [t.clone() for t in self.k]
        self.v = [t.clone() for t in self.v]
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)  # next write slot
        self.row_pos = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)  # next RoPE position
        self._graph_step = False
        if attention == "paged":
            self._init_pages()

    def _init_pages(self, page: int = 16) -> None:
        """Decode K/V also kept token-major in whole pages, one run of pages per row: the lesson-02 layout
        with an identity block table, so the flash-decoding kernel reads it with device-side lengths."""
        B, S = self.max_batch_size, -(-self.max_seq_len // page) * page
        self.page, self.row_stride = page, S
        shape = (B * S, self.num_heads, self.head_dim)
        self.k_pages = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_pages = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        pages_per_row = S // page
        rows = torch.arange(B, device=self.device)[:, None] * pages_per_row
        self.block_tables = (rows + torch.arange(pages_per_row, device=self.device)).to(torch.int32)
        self.row_base = torch.arange(B, device=self.device) * S  # flat index of each row's slot 0

    def sync_to_device(self) -> None:
        B, T = self.batch_size, self.seq_len
        self.slot.fill_(T)
        self.row_pos[:B] = self.key_valid[:B].sum(-1)
        if self.attention == "paged":
            if not bool(self.key_valid[:B, :T].all()):
                raise ValueError("attention='paged' has no padding mask: use equal-length prompts or 'sdpa'")
            for layer in range(self.num_layers):  # the prefill's K/V, head-major -> token-major pages
                for src, dst in ((self.k[layer], self.k_pages[layer]), (self.v[layer], self.v_pages[layer])):
                    dst.view(self.max_batch_size, self.row_stride, self.num_heads, self.head_dim)[:B, :T] = (
                        src[:B, :, :T].transpose(1, 2))
        self._graph_step = True

    def begin_forward(self, input_ids: torch.Tensor, attention_mask_: torch.Tensor | None = None) -> torch.Tensor:
        if not self._graph_step:
            return super().begin_forward(input_ids, attention_mask_)
        B = input_ids.shape[0]
        if input_ids.shape[1] != 1:
            raise ValueError("after prefill, a GraphKVCache takes one token per row per step")
        self.key_valid.index_fill_(1, self.slot, True)
        self._mask = self.key_valid[:B, None, None, :]  # every written, real slot; later slots are still False
        if self.attention == "paged":  # once per step, not per layer
            self._flat = self.row_base[:B] + self.slot  # this step's slot in each row's run of pages
            self._lens = (self.slot + 1).to(torch.int32).repeat(B)  # a real [B] tensor: the kernel indexes it
        return self.row_pos[:B, None].clone()

    @property
    def fuses_rope(self) -> bool:
        """True in graph decode steps with fused_rope: the model hands over q/k/v before RoPE."""
        return self.fused_rope and self._graph_step

    def attend_unrotated(self, layer: int, q, k, v, cos, sin) -> torch.Tensor:
        """One kernel rotates q and k and writes k/v into this step's page slot, then paged attention."""
        from .kernels.rope import rope_and_cache

        q_rot = rope_and_cache(q[:, 0], k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], self.k_pages[layer],
                               self.v_pages[layer], self._flat)  # fmt: skip
        return self._paged_attention(layer, q_rot)[:, :, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._graph_step:
            return super().attend(layer, q, k, v)
        B = q.shape[0]
        if self.attention == "paged":
            return self._attend_paged(layer, q, k, v)
        k_all, v_all = self.k[layer], self.v[layer]
        if B < self.max_batch_size:
            k_all, v_all = k_all[:B], v_all[:B]
        k_all.index_copy_(2, self.slot, k)
        v_all.index_copy_(2, self.slot, v)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=self._mask, enable_gqa=q.shape[1] != k.shape[1])

    def _attend_paged(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k_pages[layer].index_copy_(0, self._flat, k[:, :, 0])
        self.v_pages[layer].index_copy_(0, self._flat, v[:, :, 0])
        return self._paged_attention(layer, q[:, :, 0])[:, :, None]

    def _paged_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D] over each row's pages, this step's token included -> [B, Hq, D]."""
        pages = (-1, self.page, self.num_heads, self.head_dim)
        return graph_paged_decode(q, self.k_pages[layer].view(pages), self.v_pages[layer].view(pages),
                                  self.block_tables[: q.shape[0]], self._lens, self.row_stride)

    def advance(self) -> None:
        self.slot += 1
        self.row_pos += 1

    def reset(self) -> None:
        super().reset()
        self._graph_step = False


class CUDAGraphDecoder:
    """Greedy generation where each decode step is one graph replay and the host never waits.

    The step writes its argmax into the input buffer of the next step and into the output buffer, so
    `max_new_tokens` replays run back to back with no host-device synchronisation. On a CPU (or with
    `use_graph=False`) the same step runs eagerly, which is how the tests check it.
    """

    def __init__(self, model, max_batch_size: int, max_seq_len: int, *, use_graph: bool | None = None,
                 compile: bool | str = False, attention: str = "sdpa", fused_rope: bool = False) -> None:
        self.model = model
        c = model.config
        self.cache = GraphKVCache(c.num_hidden_layers, max_batch_size, max_seq_len, c.num_key_value_heads,
                                  c.head_dim, dtype=model.dtype, device=model.device, attention=attention,
                                  fused_rope=fused_rope)  # fmt: skip
        self.use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        # The whole step (forward, argmax, bookkeeping) is compiled, so the small ops fuse too.
        self.step = self._step
        if compile:  # True, or an inductor mode such as "max-autotune-no-cudagraphs"
            mode = compile if isinstance(compile, str) else None
            self.step = torch.compile(self._step, dynamic=False, fullgraph=True, mode=mode)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        dev = model.device
        self.tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=dev)
        self.out = torch.zeros(max_batch_size, max_seq_len + 1, dtype=torch.long, device=dev)
        self.out_pos = torch.zeros(1, dtype=torch.long, device=dev)

    def _step(self, B: int) -> None:
        logits = self.model(self.tokens[:B], cache=self.cache)[:, -1]
        nxt = argmax_two_stage(logits)
        self.tokens[:B].copy_(nxt)
        self.out[:B].index_copy_(1, self.out_pos, nxt)
        self.out_pos += 1
        self.cache.advance()

    def _graph(self, B: int) -> torch.cuda.CUDAGraph:
        if B not in self.graphs:
            state = self._save_state()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up off the capture: compile, cuBLAS handles, allocations
                for _ in range(3):
                    self.step(B)
            torch.cuda.current_stream().wait_stream(stream)
            self._restore_state(state)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step; nothing runs until replay()
                self.step(B)
            self.graphs[B] = graph
        return self.graphs[B]

    def _save_state(self):
        c = self.cache
        return [t.clone() for t in (c.slot, c.row_pos, c.key_valid, self.tokens, self.out_pos)]

    def _restore_state(self, state) -> None:
        c = self.cache
        for dst, src in zip((c.slot, c.row_pos, c.key_valid, self.tokens, self.out_pos), state):
            dst.copy_(src)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None) -> int:
        """Run the prompt eagerly, leave its greedy next token in the input buffer; returns the batch size."""
        input_ids, attention_mask = _as_batch(self.model, input_ids, attention_mask, 0)
        B = input_ids.shape[0]
        self.cache.reset()
        logits = self.model(input_ids, cache=self.cache, attention_mask=attention_mask)[:, -1]
        self.cache.sync_to_device()
        self.tokens[:B, 0] = logits.argmax(-1)
        self.out[:B, 0] = self.tokens[:B, 0]
        self.out_pos.fill_(1)
        return B

    @torch.no_grad()
    def decode(self, B: int, steps: int) -> None:
        """`steps` more greedy tokens for every row (no synchronisation: time it with CUDA events)."""
        if steps + int(self.cache.seq_len) > self.cache.max_seq_len:  # seq_len is the prefill length here
            raise ValueError(f"{steps} steps after {self.cache.seq_len} tokens exceed max_seq_len {self.cache.max_seq_len}")
        if self.use_graph:
            graph = self._graph(B)
            for _ in range(steps):
                graph.replay()
        else:
            for _ in range(steps):
                self.step(B)
        self.cache.seq_len += steps

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None) -> torch.Tensor:
        """Greedy tokens, [B, T + max_new_tokens], equal to `generate(model, input_ids, max_new_tokens)`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        input_ids, attention_mask = _as_batch(self.model, input_ids, attention_mask, 0)
        if max_new_tokens == 0:
            return input_ids.clone()
        if input_ids.shape[1] + max_new_tokens - 1 > self.cache.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens - 1 exceeds max_seq_len {self.cache.max_seq_len}")
        B = self.prefill(input_ids, attention_mask)
        self.decode(B, max_new_tokens - 1)
        return torch.cat([input_ids, self.out[:B, :max_new_tokens]], dim=1)
