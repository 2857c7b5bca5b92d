"""Which sequences run in the next forward, and how many tokens each feeds: the engine's policy.

Every step has a token budget (`max_num_batched_tokens`) and a row budget (`max_num_seqs`). Running
sequences come first, highest priority first: each feeds what it has not computed yet, capped by the
budget left. For a decoding sequence that is its one newest token; for a sequence still in its prompt it
is the next chunk (chunked prefill), so a long prompt is spread over several steps and never stalls the
decodes beside it. Then waiting requests are admitted, in priority order, while budget and KV blocks last.

Blocks are reserved before the forward. When a running sequence cannot get one, the lowest-priority
running sequence is preempted by recompute: its blocks are freed, it goes back to the waiting queue with
every token it has produced, and when it is admitted again it is prefilled over prompt + outputs, so no
token is lost or repeated. No new request is admitted in a step that preempted (that would thrash).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from ..paged import PagedKVCache
from .sequence import Sequence, Status

POLICIES = ("fcfs", "priority")


@dataclass
class ScheduledBatch:
    """One step's work. Rows feeding one token come first (the decode kernel serves them), then the
    multi-token chunks (the varlen extend kernel). A row samples a token when its chunk reaches the end
    of the sequence; a chunk that stops short of it only fills the cache."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    num_decode: int = 0
    samples: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """FCFS or priority (lower value first, then arrival) scheduling over one PagedKVCache."""

    def __init__(self, cache: PagedKVCache, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, policy: str = "fcfs") -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, got {policy!r}")
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.key: Callable[[Sequence], tuple] = (
            (lambda s: (s.priority, s.arrival_time, s.request_id)) if policy == "priority"
            else (lambda s: (s.arrival_time, s.request_id)))
        self.waiting: list[Sequence] = []  # sorted by key
        self.running: list[Sequence] = []  # sorted by key: the last one is preempted first
        # Admission keeps this many blocks free for the running sequences' next tokens.
        self.watermark = max(1, cache.num_blocks // 100)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.max_num_tokens = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=self.key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        free = self.cache.num_free_blocks
        bs = self.cache.block_size
        rows: list[tuple[Sequence, int]] = []
        reserve: dict[int, int] = {}  # cache sequence id -> slots to append, reserved in one call at the end
        preempted: list[Sequence] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0 and len(rows) < self.max_num_seqs:
            seq = running[i]
            c, t = seq.num_computed, len(seq.token_ids) + seq.num_pending
            if t >= seq.max_num_tokens or c >= t:  # every token it may have is sampled, or all computed
                i += 1
                continue
            n = min(t - c, budget)
            need = -(-(c + n) // bs) - (-(-c // bs))  # new blocks: sequences never share a partly filled block
            if need > free:
                victim = running[-1]  # lowest priority; never one already scheduled (those are before i)
                free += self.preempt(victim)
                preempted.append(victim)
                continue  # retry seq (or stop: it was the victim and the loop condition ends it)
            free -= need
            seq.num_computed += n
            reserve[seq.cache_seq] = n
            rows.append((seq, n))
            budget -= n
            i += 1

        while (not preempted and self.waiting and budget > 0 and len(rows) < self.max_num_seqs
               and len(running) < self.max_num_seqs):
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while its last token was in flight: wait until it is read back
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = -(-n // bs)
            if need > free or (running and free - need < self.watermark):
                break
            self.waiting.pop(0)
            seq.cache_seq, seq.status = self.cache.add_sequence(), Status.RUNNING
            free -= need
            seq.num_computed += n
            reserve[seq.cache_seq] = n
            bisect.insort(running, seq, key=self.key)
            rows.append((seq, n))
            budget -= n
        self.cache.tables.append_slots_many(reserve)  # all or nothing; the counts above make it fit

        batch = ScheduledBatch(preempted=preempted)
        for seq, n in sorted(rows, key=lambda r: r[1] > 1):  # stable: one-token rows first, order kept
            batch.seqs.append(seq)
            batch.num_new.append(n)
            batch.samples.append(seq.num_computed == seq.num_tokens)
        batch.num_decode = sum(1 for n in batch.num_new if n == 1)
        return batch

    def preempt(self, seq: Sequence) -> int:
        """Free the sequence's blocks and queue it again; it is recomputed from its tokens when re-admitted.
        Returns how many blocks went back to the pool."""
        freed = self.cache.free(seq.cache_seq)
        seq.cache_seq, seq.num_computed = None, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.add(seq)
        return freed

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out for good (finished or aborted); its blocks go back to the pool at once."""
        if seq.cache_seq is not None:
            self.cache.free(seq.cache_seq)
            seq.cache_seq = None
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
