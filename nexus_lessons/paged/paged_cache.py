"""PagedKVCache: the KV cache cut into fixed-size blocks, vLLM style, behind the model's cache protocol.

Memory. Per layer, K and V live in pools `[num_blocks, block_size, num_kv_heads, head_dim]` (the vLLM
layout: `self.k[layer]`). A sequence holds a block table (a list of block ids) and takes one block
at a time as it grows, so no memory is reserved for tokens that never come; the only waste is the
unfilled tail of each sequence's last block (see `fragmentation.py`).

Sequences. Each batch row is one sequence. Only a row's *real* tokens are stored: left padding is
never written, and a token's RoPE position is the number of real tokens before it. That keeps the
exactness invariant simple: every query attends to exactly the keys a no-cache forward would let it
see (its own sequence, up to itself), with no padding keys to mask.

Two ways to drive it:

* like `KVCache`: `generate(model, ids, n, cache=PagedKVCache(...))`. `reset()` frees every sequence;
  the next forward creates one sequence per batch row, and later forwards extend them.
* by sequence, for a scheduler: `add_sequence()`, `fork(seq_id)` (copy-on-write sharing), `free(seq_id)`,
  `append_slots(seq_id, n)` (reserve room ahead of a forward; the forward fills reserved slots first),
  then `bind([seq ids])` to say which sequence each batch row of the next forwards is, or the helper
  `forward_sequences(model, cache, seq_ids, new_tokens)` which does the padding and binding for you.

Kernels. Writes go through `write_kv_cache`, decode steps (one new token per row) through
`paged_decode_attention`, prefill / extend / mixed steps through `paged_prefill_attention` (packed
variable-length queries, causal within each sequence's new tokens; the new tokens' K/V also passed as
packed rows, so only the cached prefix is gathered from the pages). All three come from
`nexus_lessons.kernels`, which picks compiled Triton, the Triton interpreter or plain PyTorch.

Running out of blocks raises `OutOfBlocksError` in `begin_forward`, before any layer runs and before
any block table, refcount or free list has changed: catch it, free or preempt a sequence, retry.

Quantized blocks (lesson 03). `kv_cache_dtype="int8" | "fp8" | "int4"` stores the pools quantized, with
their scales beside them under the same block ids (`nexus_lessons.quant.pool`); `dtype` stays the
compute dtype, and the writes and attention go through `nexus_lessons.kernels.quant`, which dequantize in
registers. `self.k[layer]` / `self.v[layer]` are then the quantized blocks.

Prefix caching (lesson 04). With `prefix_cache="hash"` (vLLM's hash-chained full blocks), `"radix"`
(SGLang's radix tree, token granularity) or a `PrefixCache` / `RadixPrefixCache` object, a new sequence
starts from the longest cached prefix of its prompt, and a finished one leaves its blocks cached. The
cache holds one reference per cached block in this pool, so a shared block is copied before anyone
writes into it, and cached blocks no sequence uses count as free (`num_free_blocks`) and are evicted,
least recently used first, when an allocation needs them. A scheduler drives it with three calls:

    seq_id = cache.add_sequence(prompt_token_ids)   # attaches the longest cached prefix (never the whole
    done = cache.num_tokens(seq_id)                 #   prompt: the last token is always computed)
    forward_sequences(model, cache, [seq_id], [prompt_token_ids[done:]])  # then decode as usual
    ...
    cache.free(seq_id, token_ids)                   # finished or preempted: caches the K/V of token_ids
                                                    #   (prompt + generated ids; those computed count)

`cache_tokens(seq_id, token_ids)` caches a running sequence's full blocks now (after its prefill), so
requests that arrive while it runs can share them. `reset()` frees every sequence the same way, with the
prompts given to `add_sequence`; `prefix_hit_tokens` counts the prompt tokens served from the cache.
`generate(model, ids, n, cache=cache)` does all of this for every row of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..config import as_device, as_dtype
from ..kernels import paged_decode_attention, paged_prefill_attention, write_kv_cache
from ..kv_cache import _check_positive
from ..prefix import make_prefix_cache
from ..prefix.base import check_token_ids
from .block_allocator import BlockAllocator, OutOfBlocksError
from .block_table import BlockTables

__all__ = ["OutOfBlocksError", "PagedKVCache", "forward_sequences"]


@dataclass
class _ForwardPlan:
    """What `begin_forward` worked out once for every layer of one forward."""

    rows: list[int]  # seq id of each batch row
    valid: torch.Tensor | None  # [B, T] bool on the device; None when every token is real
    decode: bool  # exactly one real new token per row
    slot_mapping: torch.Tensor  # [N] int64: the slot of each real new token, row-major
    block_tables: torch.Tensor  # [B_active, max_blocks] int32, rows with new tokens only
    context_lens: torch.Tensor  # [B_active] int32, tokens held after this forward
    query_start_loc: torch.Tensor  # [B_active + 1] int32, offsets into the packed new tokens
    max_query_len: int
    max_context_len: int
    mean_context_len: float  # with the max: tells the decode kernel whether the lengths are spread
    shape: tuple[int, int]  # (B, T)


class PagedKVCache:
    """A block-paged KV cache with copy-on-write sharing between sequences.

    `num_heads` is the number of key/value heads (fewer than query heads under GQA). Capacity is
    `num_blocks * block_size` tokens over all sequences together. `prefix_cache`: None, "hash",
    "radix", or a `PrefixCache` / `RadixPrefixCache` object (see the module docstring).
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        kv_cache_dtype: str = "auto",
        prefix_cache=None,
    ) -> None:
        _check_positive(num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                        block_size=block_size, num_blocks=num_blocks)
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        dtype, device = as_dtype(dtype) or torch.get_default_dtype(), as_device(device)
        self._dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype
        self.quant = None  # the quantized pools and scales (lesson 03), or None for "auto"
        if kv_cache_dtype == "auto":
            shape = (num_layers, num_blocks, block_size, num_heads, head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)  # self.k[layer]: one layer's pool
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        else:
            from ..quant.pool import QuantizedPool

            self.quant = QuantizedPool(kv_cache_dtype, num_layers, num_blocks, block_size, num_heads, head_dim,
                                       dtype, device)  # fmt: skip
            self.k, self.v = self.quant.data["k"], self.quant.data["v"]
        self._quant_plan = None
        self.allocator = BlockAllocator(num_blocks)
        self.tables = BlockTables(self.allocator, block_size, copy_blocks=self._copy_blocks)
        self._computed: dict[int, int] = {}  # seq id -> tokens whose K/V are written
        self.prefix_cache = make_prefix_cache(prefix_cache)
        if self.prefix_cache is not None:
            self.prefix_cache.bind(self.allocator, block_size)
        self._token_ids: dict[int, list[int]] = {}  # seq id -> its known token ids (the prompt), for caching
        self.prefix_hit_tokens = 0  # prompt tokens served from the prefix cache so far
        # Let the kernels re-check slots and block ids on CPU (cheap there); on a GPU it would be a sync.
        self.validate_kernel_args = self.device.type != "cuda"
        self._clear_rows()

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int | None = None, *, kv_cache_dtype: str = "auto",
                  prefix_cache=None) -> PagedKVCache:
        """Sized for `model`; `block_size` defaults to 16, and to 64 for int4 (its keys' quantization group:
        the per-block scales then cost 0.5 bits per key, section 8 of lesson 03)."""
        c = model.config
        block_size = block_size or (64 if kv_cache_dtype == "int4" else 16)
        return cls(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, block_size, num_blocks,
                   dtype=model.dtype, device=model.device, kv_cache_dtype=kv_cache_dtype, prefix_cache=prefix_cache)

    # --- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (K/V arrive and attention returns in it), whatever the blocks store."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V pools (all blocks, used or not), scales and int4's tail slots included."""
        return self.k.nbytes + self.v.nbytes if self.quant is None else self.quant.nbytes

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (cached blocks that no sequence uses included)."""
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    @property
    def capacity(self) -> int:
        """Tokens the whole pool can hold."""
        return self.num_blocks * self.block_size

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K pool, [num_blocks, block_size, Hkv, D] (a view)."""
        return self.k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    # --- the sequence API (what a scheduler uses) ----------------------------------------------
    def add_sequence(self, prompt_token_ids=None) -> int:
        """A new sequence; returns its id. Given its prompt's token ids and a prefix cache, it starts with
        the longest cached prefix of the prompt (`num_tokens(seq_id)` says how long), never all of it."""
        if prompt_token_ids is None:
            seq_id = self.tables.add_sequence()
            self._computed[seq_id] = 0
            return seq_id
        tokens = check_token_ids(prompt_token_ids, "prompt_token_ids")
        if not tokens:
            raise ValueError("empty prompt: prompt_token_ids needs at least one token")
        blocks, n = [], 0
        if self.prefix_cache is not None:
            blocks, n = self.prefix_cache.match(tokens[:-1])  # the last token's logits are always computed
        seq_id = self.tables.add_sequence(blocks, n)
        self._computed[seq_id] = n
        self._token_ids[seq_id] = tokens
        self.prefix_hit_tokens += n
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all of `seq_id`'s blocks (copy-on-write); returns its id."""
        child = self.tables.fork(seq_id)
        self._computed[child] = self._computed[seq_id]
        if seq_id in self._token_ids:  # what both have computed; each may go on differently
            self._token_ids[child] = self._token_ids[seq_id][: self._computed[seq_id]]
        return child

    def free(self, seq_id: int, token_ids=None) -> int:
        """Forget a sequence; returns how many blocks went back to the free list.

        With a prefix cache, its computed tokens are cached first: `token_ids` are the sequence's token
        ids (prompt + generated; default: the prompt given to `add_sequence`)."""
        self.cache_tokens(seq_id, token_ids, full_blocks_only=False)
        freed = self.tables.free(seq_id)
        del self._computed[seq_id]
        self._token_ids.pop(seq_id, None)
        return freed

    def cache_tokens(self, seq_id: int, token_ids=None, *, full_blocks_only: bool = True) -> int:
        """Put a sequence's computed tokens in the prefix cache now; returns how many blocks it took.

        A running sequence caches only its full blocks (its last block is still being written; caching it
        would make the sequence copy it at its next token). `free` caches the partial block too."""
        if seq_id not in self._computed:
            self.tables.block_table(seq_id)  # raises the KeyError that names the problem
        if self.prefix_cache is None:
            return 0
        known = self._token_ids.get(seq_id)
        if token_ids is None:
            if known is None:
                return 0
            tokens = known
        else:
            tokens = check_token_ids(token_ids)
            if known is not None and tokens[:len(known)] != known[:len(tokens)]:
                raise ValueError(f"token_ids of sequence {seq_id} do not start with the prompt it was added with")
            if known is None or len(tokens) > len(known):
                self._token_ids[seq_id] = tokens
        n = min(self._computed[seq_id], len(tokens))
        if full_blocks_only:
            n -= n % self.block_size
        if n == 0:
            return 0
        return self.prefix_cache.insert(tokens[:n], self.tables.seqs[seq_id].blocks[: -(-n // self.block_size)])

    def append_slots(self, seq_id: int, n: int) -> list[int]:
        """Reserve `n` more slots for a sequence (allocating / copying blocks now); returns the slots.

        Raises OutOfBlocksError, having changed nothing, when the pool cannot hold them. The next
        forward that feeds this sequence new tokens writes into reserved slots first.
        """
        return self.tables.append_slots(seq_id, n)

    def check_capacity(self, num_tokens: Seq[int]) -> None:
        """Raise OutOfBlocksError unless new sequences of these lengths fit in the free blocks together.

        `generate` calls it before the first forward, so a request the pool cannot finish fails before
        it starts, not halfway with its tokens lost.
        """
        needed = sum(-(-int(n) // self.block_size) for n in num_tokens)
        if needed > self.num_free_blocks:
            what = f"{len(num_tokens)} sequence(s) of up to {max(num_tokens)} tokens in blocks of {self.block_size}"
            raise OutOfBlocksError(needed, self.num_free_blocks, self.num_blocks, what)

    def can_append(self, appends: dict[int, int]) -> bool:
        """Whether reserving `{seq_id: n}` slots would fit in the free blocks (copy-on-write included)."""
        return self.tables.can_append(appends)

    def truncate(self, seq_id: int, num_tokens: int) -> int:
        """Keep a sequence's first `num_tokens` tokens (drop the rest, reservations too)."""
        freed = self.tables.truncate(seq_id, num_tokens)
        self._computed[seq_id] = min(self._computed[seq_id], num_tokens)
        if seq_id in self._token_ids:  # later tokens may differ from the ones recorded
            del self._token_ids[seq_id][num_tokens:]
        return freed

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """For a caller that writes the pools itself (lesson 10's engine): the first `num_tokens` reserved
        slots of the sequence hold K/V, or will once its launched forward runs (what `free` caches)."""
        if not 0 <= num_tokens <= self.tables.num_tokens(seq_id):
            raise ValueError(f"sequence {seq_id} has {self.tables.num_tokens(seq_id)} slots, not {num_tokens}")
        self._computed[seq_id] = num_tokens

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables.block_table(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens of `seq_id` whose K/V are in the cache."""
        if seq_id not in self._computed:
            self.tables.block_table(seq_id)  # raises the KeyError that names the problem
        return self._computed[seq_id]

    @property
    def sequences(self) -> list[int]:
        return self.tables.seq_ids()

    def bind(self, seq_ids: Seq[int] | None) -> None:
        """Batch row i of the following forwards is sequence `seq_ids[i]` (None: one new per row)."""
        if seq_ids is None:
            self._clear_rows()
            return
        seq_ids = [int(s) for s in seq_ids]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence can be only one row of a batch; got {seq_ids}")
        for s in seq_ids:
            self.tables.block_table(s)  # KeyError for an unknown id
        self._rows = seq_ids
        self._base = [self._computed[s] for s in seq_ids]
        self._history: list[torch.Tensor] = []
        self.seq_len = 0

    @property
    def rows(self) -> list[int] | None:
        """The sequence id of each batch row, or None before the first forward after reset()."""
        return None if self._rows is None else list(self._rows)

    def check_consistent(self) -> None:
        """Assert that no block is leaked or double-owned (for tests and the lesson's checkers)."""
        cached = self.prefix_cache
        self.tables.check_consistent([cached.blocks()] if cached is not None else [])
        if cached is not None:
            cached.check_consistent()
        for s, n in self._computed.items():
            if not 0 <= n <= self.tables.num_tokens(s):
                raise AssertionError(f"sequence {s}: {n} tokens written but {self.tables.num_tokens(s)} slots")

    # --- the model's cache protocol --------------------------------------------------------------
    def reset(self) -> None:
        """Free every sequence (the pools are kept for reuse; a prefix cache keeps what it cached, and
        caches the prompts of the sequences freed here)."""
        for seq_id in self.tables.seq_ids():
            self.free(seq_id)
        self._clear_rows()

    def _clear_rows(self) -> None:
        self._rows: list[int] | None = None
        self._base: list[int] = []
        self._history = []  # one [B, T] CPU bool chunk per forward since bind: which slots were real
        self.seq_len = 0  # time slots fed since the rows were bound (padding included), like KVCache
        self._plan: _ForwardPlan | None = None

    def begin_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve slots for each row's real new tokens; return RoPE positions [B, T].

        Row b's real tokens are those with `attention_mask[b] == 1` (all, without a mask). Raises
        OutOfBlocksError before changing anything when the free blocks do not suffice.
        """
        B, T = input_ids.shape
        if input_ids.device != self.device:
            raise ValueError(f"input is on {input_ids.device} but the cache is on {self.device}")
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, T)}")
        valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        valid_cpu = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.cpu()
        n_new = valid_cpu.sum(1).tolist()
        if not any(n_new):
            raise ValueError("attention_mask marks no real token in this batch: nothing to run")
        created = self._rows is None
        if created:
            self.bind([self.add_sequence() for _ in range(B)])
        elif len(self._rows) != B:
            raise ValueError(
                f"this cache's batch has {len(self._rows)} rows (sequences {self._rows}); got a batch of {B} "
                f"(call reset() or bind() first)"
            )
        rows = self._rows
        try:
            done = [self._computed[s] for s in rows]
        except KeyError:
            raise KeyError(f"a sequence of this batch ({rows}) was freed; bind() live sequences") from None
        extra = {s: max(0, d + n - self.tables.num_tokens(s)) for s, d, n in zip(rows, done, n_new)}
        try:
            self.tables.append_slots_many(extra)  # all or nothing
        except OutOfBlocksError:
            if created:
                for s in rows:
                    self.free(s)
                self._clear_rows()
            raise

        # Slots, block tables and lengths for the rows that have new tokens.
        active = [i for i in range(B) if n_new[i]]
        tables = [self.tables.seqs[rows[i]].blocks for i in active]
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        starts = torch.tensor([done[i] for i in active])
        counts = torch.tensor([n_new[i] for i in active])
        row_of = torch.repeat_interleave(torch.arange(len(active)), counts)
        pos = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        pos = pos + starts[row_of]
        bs = self.block_size
        slot_mapping = bt[row_of, pos // bs].long() * bs + pos % bs
        context = starts + counts
        qsl = torch.zeros(len(active) + 1, dtype=torch.int32)
        qsl[1:] = counts.cumsum(0)
        dev = self.device
        self._plan = _ForwardPlan(
            rows=list(rows), valid=valid, decode=T == 1 and len(active) == B,
            slot_mapping=slot_mapping.to(dev), block_tables=bt.to(dev),
            context_lens=context.to(torch.int32).to(dev), query_start_loc=qsl.to(dev),
            max_query_len=int(counts.max()), max_context_len=int(context.max()),
            mean_context_len=float(context.float().mean()), shape=(B, T),
        )
        for s, d, n in zip(rows, done, n_new):
            self._computed[s] = d + n
        if self.quant is not None:  # int4: which blocks fill now, and where each unfilled block's tail lives
            live = {s: (self.tables.seqs[s].blocks, n) for s, n in self._computed.items()}
            self._quant_plan = self.quant.plan(tables, [done[i] for i in active], [n_new[i] for i in active], live, dev)
        self._history.append(valid_cpu)
        self.seq_len += T
        before = torch.tensor(done, device=input_ids.device)[:, None]
        if valid is None:
            return before + torch.arange(T, device=input_ids.device)
        return (before + valid.long().cumsum(-1) - 1).clamp(min=0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this forward's real K/V into the pools, then attend each query over its own sequence."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("attend() before begin_forward(): run the model with cache=this cache")
        if k.dtype != self.dtype:
            raise TypeError(f"the cache holds {self.dtype} but the model gives {k.dtype}; build it with dtype={k.dtype}")
        if k.shape[1] != self.num_heads or k.shape[-1] != self.head_dim:
            raise ValueError(f"cache is for {self.num_heads} KV heads of dim {self.head_dim}; got k {tuple(k.shape)}")
        B, Hq, T, D = q.shape
        if (B, T) != plan.shape:
            raise ValueError(f"begin_forward planned a [{plan.shape[0]}, {plan.shape[1]}] batch; got q {tuple(q.shape)}")
        k_pool, v_pool = self.k[layer], self.v[layer]
        if plan.valid is None:  # every token real: [B, H, T, D] -> [B*T, H, D]
            k_new = k.transpose(1, 2).reshape(B * T, -1, D)
            v_new = v.transpose(1, 2).reshape(B * T, -1, D)
        else:
            k_new, v_new = k.transpose(1, 2)[plan.valid], v.transpose(1, 2)[plan.valid]
        # The metadata is built here from the block tables, so the kernels need not re-check it (a GPU sync).
        check = self.validate_kernel_args
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
        if self.quant is not None:
            return self._attend_quantized(layer, q, k_new, v_new, plan)
        write_kv_cache(k_new, v_new, k_pool, v_pool, plan.slot_mapping, validate=check)
        if plan.decode:
            out = paged_decode_attention(
                q[:, :, 0].contiguous(), k_pool, v_pool, plan.block_tables, plan.context_lens,
                max_context_len=plan.max_context_len, mean_context_len=plan.mean_context_len, validate=check,
            )
            return out[:, :, None]
        if plan.valid is None:
            q_packed = q.transpose(1, 2).reshape(B * T, Hq, D)
        else:
            q_packed = q.transpose(1, 2)[plan.valid]
        # The new tokens' K/V, just written to their slots, are passed as packed rows too: the kernel gathers
        # only the cached prefix from the pages and reads these contiguously (TMA on Hopper).
        out_packed = paged_prefill_attention(
            q_packed.contiguous(), k_pool, v_pool, plan.block_tables, plan.context_lens, plan.query_start_loc,
            k_new=k_new, v_new=v_new, max_query_len=plan.max_query_len, validate=check,
        )
        if plan.valid is None:
            return out_packed.view(B, T, Hq, D).transpose(1, 2)
        out = q.new_zeros(B, T, Hq, D)  # padding queries get zeros: nothing real ever reads them
        out[plan.valid] = out_packed
        return out.transpose(1, 2)

    def _attend_quantized(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                          plan: _ForwardPlan) -> torch.Tensor:  # fmt: skip
        """`attend` for quantized blocks: quantize on write, then attend with the dequantizing kernels."""
        check, qp, B, Hq, T, D = self.validate_kernel_args, self._quant_plan, *q.shape
        self.quant.write(layer, k_new, v_new, plan.slot_mapping, qp, check)
        if plan.decode:
            out = self.quant.decode(layer, q[:, :, 0].contiguous(), plan.block_tables, plan.context_lens, qp,
                                    plan.max_context_len, check)  # fmt: skip
            return out[:, :, None]
        q_packed = q.transpose(1, 2).reshape(B * T, Hq, D) if plan.valid is None else q.transpose(1, 2)[plan.valid]
        out_packed = self.quant.extend(layer, q_packed.contiguous(), k_new, v_new, plan.block_tables, plan.context_lens,
                                       plan.query_start_loc, qp, plan.max_query_len, check)  # fmt: skip
        if plan.valid is None:
            return out_packed.view(B, T, Hq, D).transpose(1, 2)
        out = q.new_zeros(B, T, Hq, D)
        out[plan.valid] = out_packed
        return out.transpose(1, 2)

    def crop(self, length: int) -> None:
        """Drop every time slot from `length` on (speculative decoding rolls back this way).

        Like `KVCache.crop`, `length` counts slots along the batch's time axis (padding included)
        since the rows were bound; each row keeps its real tokens among the first `length` slots.
        """
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"cannot crop to {length}: the cache holds {self.seq_len} slots")
        if self._rows is None or length == self.seq_len:
            return
        history = torch.cat(self._history, dim=1)[:, :length]
        keep = history.sum(1).tolist()
        for s, base, n in zip(self._rows, self._base, keep):
            self.truncate(s, base + n)
        self._history = [history]
        self.seq_len = length
        self._plan = None

    # --- copy-on-write ---------------------------------------------------------------------------
    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks src -> dst in every layer's K and V pool, on the device, in one op each."""
        if self.quant is not None:
            self.quant.copy_blocks(src, dst)
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, blocks={self.num_blocks} ({self.num_free_blocks} free), "
            f"sequences={len(self.tables)}, dtype={self.dtype}, "
            + ("" if self.quant is None else f"kv_cache_dtype={self.kv_cache_dtype}, ")
            + f"device={self.device})"
        )


def forward_sequences(model, cache: PagedKVCache, seq_ids: Seq[int], new_tokens: Seq[Seq[int]]) -> torch.Tensor:
    """One forward over several sequences, each with its own number of new tokens (prefill, decode,
    or a mix). Returns the logits of each sequence's last new token, [len(seq_ids), vocab].

    The rows are left-padded; padding is never stored, so the result is the same as running each
    sequence alone.
    """
    from ..generate import left_pad

    if len(seq_ids) != len(new_tokens):
        raise ValueError(f"{len(seq_ids)} sequences but {len(new_tokens)} token lists")
    ids, mask = left_pad(new_tokens, device=model.device)
    cache.bind(seq_ids)
    return model(ids, cache=cache, attention_mask=None if bool(mask.all()) else mask)[:, -1]
