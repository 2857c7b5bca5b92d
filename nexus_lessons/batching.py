"""The reference docs' batching loop, as they write it, and three ways to fill its batches.

    batcher = ContinuousBatcher(max_batch_size=8, max_seq_len=256, scheduling_policy="priority")
    for input_ids in requests:
        batcher.add_request(input_ids, max_new_tokens=100)
    while batcher.has_active_requests():
        batch = batcher.prepare_batch()
        logits = model(batch.input_ids, batch.attention_mask)
        next_tokens = sample(logits)
        completed = batcher.step(next_tokens)

* `StaticBatcher`: request-level batching. A batch is formed once and runs until its longest request
  is done; no new request joins, and a request that finished early keeps its seat (without a cache its
  row is still recomputed every step, as a padded row of a static batch is).
* `ContinuousBatcher`: at every step finished requests leave and waiting ones take their seats. Without
  a cache each step recomputes every active sequence in full (the loop above, exactly as written).
* `IterationLevelBatcher`: Orca's iteration-level scheduling over a `PagedKVCache`: each step feeds only
  new tokens (a newcomer's whole prompt, one token for the others) and the cache supplies the rest, so
  the loop passes the cache: `model(batch.input_ids, batch.attention_mask, cache=batch.cache)`. When the
  pool runs out of blocks, the lowest-priority request is preempted and later recomputed.
  (`ContinuousBatcher(kv_cache=cache)` is the same thing.)

`step(next_tokens)` takes one token id per row ([B] ints, or [B, T] ints whose last column is used), or
logits ([B, V], or the model's [B, T, V], whose last position is used): logits mean greedy (argmax).
Rows are left-padded, so a row's last position is always its newest real token. Priorities: a lower
value runs first (vLLM's convention); ties and "fcfs" go by arrival.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from numbers import Integral

import torch

from .generate import left_pad
from .paged import OutOfBlocksError, PagedKVCache

POLICIES = ("fcfs", "priority")


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: list[int]
    max_new_tokens: int
    priority: int
    output: list[int] = field(default_factory=list)
    seq_id: int | None = None  # its sequence in the PagedKVCache (iteration-level only)
    num_computed: int = 0  # tokens whose K/V the cache holds
    done: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor  # [B, T], 1 for real tokens
    request_ids: list[int]
    cache: PagedKVCache | None = None  # pass it to the model: model(ids, mask, cache=batch.cache)


@dataclass
class CompletedRequest:
    request_id: int
    input_ids: torch.Tensor  # the prompt
    output_ids: torch.Tensor  # the generated tokens
    finish_reason: str  # "stop" (eos) or "length"


class ContinuousBatcher:
    static = False  # StaticBatcher: no one joins a running batch

    def __init__(self, max_batch_size: int = 8, max_seq_len: int = 2048, scheduling_policy: str = "fcfs",
                 kv_cache: PagedKVCache | None = None, *, eos_token_id: int | None = None,
                 pad_token_id: int = 0, device: torch.device | str | None = None) -> None:
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {POLICIES}, got {scheduling_policy!r}")
        if kv_cache is not None and not isinstance(kv_cache, PagedKVCache):
            raise TypeError(f"kv_cache must be a PagedKVCache, got {type(kv_cache).__name__}")
        self.max_batch_size, self.max_seq_len, self.policy = max_batch_size, max_seq_len, scheduling_policy
        self.cache, self.eos_token_id, self.pad_token_id = kv_cache, eos_token_id, pad_token_id
        self.device = kv_cache.device if kv_cache is not None else torch.device(device or "cpu")
        self.waiting: list[Request] = []  # sorted by _key
        self.active: list[Request] = []  # the seats; sorted by _key
        self.batch_rows: list[Request] | None = None  # the rows of the batch prepare_batch returned
        self._ids = itertools.count()
        self.num_preemptions = 0
        self.num_steps = 0

    def _key(self, r: Request) -> tuple:
        return (r.priority, r.request_id) if self.policy == "priority" else (r.request_id,)

    # --- the docs' API -------------------------------------------------------------------------------
    def add_request(self, input_ids, max_new_tokens: int, priority: int = 0) -> int:
        ids = input_ids.flatten().tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        if not ids or not all(isinstance(t, Integral) for t in ids):
            raise ValueError("a request needs a non-empty list (or 1-D tensor) of token ids")
        if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"{self.max_seq_len}")
        if self.cache is not None and len(ids) + max_new_tokens - 1 > self.cache.capacity:
            raise ValueError(f"prompt + max_new_tokens needs {len(ids) + max_new_tokens - 1} KV slots; "
                             f"the pool holds {self.cache.capacity}")
        req = Request(next(self._ids), [int(t) for t in ids], int(max_new_tokens), int(priority))
        bisect.insort(self.waiting, req, key=self._key)
        return req.request_id

    def has_active_requests(self) -> bool:
        return bool(self.waiting or self.active)

    def prepare_batch(self) -> Batch:
        """Seat waiting requests (policy order) where there is room, then build this step's batch."""
        if not (self.static and self.active):
            while self.waiting and len(self.active) < self.max_batch_size:
                bisect.insort(self.active, self.waiting.pop(0), key=self._key)
        if not self.active:
            raise RuntimeError("no active requests: check has_active_requests() first")
        if self.cache is None:
            rows = list(self.active)
            new = [r.tokens for r in rows]  # recompute: every token of every sequence, every step
        else:
            rows, new = self._reserve()
        ids, mask = left_pad(new, self.pad_token_id, self.device)
        self.batch_rows = rows
        if self.cache is not None:
            self.cache.bind([r.seq_id for r in rows])
        return Batch(ids, mask, [r.request_id for r in rows], self.cache)

    def step(self, next_tokens: torch.Tensor) -> list[CompletedRequest]:
        """Append each row's next token; returns the requests that finished with it."""
        rows = self.batch_rows
        if rows is None:
            raise RuntimeError("step() before prepare_batch()")
        tokens = _one_token_per_row(next_tokens, len(rows))
        if self.cache is not None:
            if self.cache.seq_len == 0:
                raise RuntimeError("the model ran without the cache: call "
                                   "model(batch.input_ids, batch.attention_mask, cache=batch.cache)")
            for r in rows:
                r.num_computed = len(r.tokens)
        completed = []
        for r, t in zip(rows, tokens):
            if r.done:  # a finished row of a static batch: its token is padding
                continue
            r.output.append(t)
            stop = self.eos_token_id is not None and t == self.eos_token_id
            if stop or len(r.output) >= r.max_new_tokens:
                r.done = True
                completed.append(CompletedRequest(r.request_id, torch.tensor(r.prompt), torch.tensor(r.output),
                                                  "stop" if stop else "length"))
                if self.static:  # it keeps its seat until the batch ends, but not its blocks
                    self._free_blocks(r)
                else:
                    self._leave(r)
        if self.static and all(r.done for r in self.active):
            self.active.clear()  # the static batch is over: everyone leaves together
        self.batch_rows = None
        self.num_steps += 1
        return completed

    # --- iteration-level: the cache ---------------------------------------------------------------
    def _reserve(self) -> tuple[list[Request], list[list[int]]]:
        """Slots for every seated request's new tokens; preempt the lowest priority when blocks run out."""
        i = 0
        while i < len(self.active):
            r = self.active[i]
            if r.done:  # a finished request still holding its seat in a static batch: nothing to feed
                i += 1
                continue
            if r.seq_id is None:
                r.seq_id = self.cache.add_sequence()
            n = len(r.tokens) - r.num_computed
            try:
                self.cache.append_slots(r.seq_id, n)
                i += 1
            except OutOfBlocksError:
                victim = [v for v in self.active if not v.done][-1]  # lowest priority
                self._leave(victim)
                victim.num_computed = 0
                bisect.insort(self.waiting, victim, key=self._key)  # back in line; recomputed when seated
                self.num_preemptions += 1
        rows = [r for r in self.active if not r.done]
        # The forward fills the reserved slots; num_computed catches up in step().
        return rows, [r.tokens[r.num_computed:] for r in rows]

    def _leave(self, r: Request) -> None:
        self.active.remove(r)
        self._free_blocks(r)

    def _free_blocks(self, r: Request) -> None:
        if r.seq_id is not None:
            self.cache.free(r.seq_id)
            r.seq_id = None


class IterationLevelBatcher(ContinuousBatcher):
    """Continuous batching over a PagedKVCache, feeding only new tokens (Orca, with vLLM's paged memory)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, kv_cache: PagedKVCache,
                 scheduling_policy: str = "fcfs", **kwargs) -> None:
        if kv_cache is None:
            raise ValueError("IterationLevelBatcher needs a PagedKVCache (kv_cache=...)")
        super().__init__(max_batch_size, max_seq_len, scheduling_policy, kv_cache, **kwargs)


class StaticBatcher(ContinuousBatcher):
    """Request-level batching, the baseline: a batch runs until its longest request is done."""

    static = True


def _one_token_per_row(x, rows: int) -> list[int]:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.is_floating_point():  # logits: greedy at the last position
        x = x[:, -1] if x.dim() == 3 else x
        x = x.argmax(-1)
    elif x.dim() == 2:  # token ids per position: the last one
        x = x[:, -1]
    if x.dim() != 1 or x.shape[0] != rows:
        raise ValueError(f"next_tokens must give one token per batch row ({rows}); got shape {tuple(x.shape)}")
    return x.tolist()
