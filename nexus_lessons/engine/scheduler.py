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

With CUDA graphs (a GPU, not `enforce_eager`) only pure decode steps replay a graph; a step holding a
prefill chunk runs eagerly, at many times the cost. So while the running batch only decodes, waiting
requests are admitted together rather than one per freed seat: once an eighth of the seats is free, or
MAX_DEFER_STEPS steps after the last admission (TGI's `max_waiting_tokens`), or when the step holds a
prefill chunk anyway. Without graphs every step costs the same and requests are admitted at once.

With a prefix cache (lesson 04) a request is admitted with `cache.add_sequence(its tokens)`, which attaches
the longest cached prefix; its prefill starts after it. Finished and preempted sequences give their
blocks back through `cache.free(seq, their tokens)`, which caches what they computed, so a preempted
request usually finds its own prefix again when it is re-admitted.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from ..paged import PagedKVCache
from .sequence import Sequence, Status

POLICIES = ("fcfs", "priority")
MAX_DEFER_STEPS = 20  # with CUDA graphs: the most decode steps between two admissions while requests wait


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
        self.num_steps = 0
        self.last_admission_step = 0
        self.defer_admission = False  # the engine sets it when its decode steps replay CUDA graphs
        self.on_release: Callable[[Sequence], None] | None = None  # told before a sequence's blocks go

    def add(self, seq: Sequence) -> None:
        seq.max_num_tokens = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=self.key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, decode: bool = True) -> ScheduledBatch:
        """The next step's rows. `decode=False` leaves out sequences that would feed one token (speculative
        decoding runs those in its own step)."""
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
            if t >= seq.max_num_tokens or c >= t or (not decode and c == t - 1):  # nothing to feed (here)
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

        self.num_steps += 1
        admit = not preempted and self._admission_open(rows)
        while (admit and self.waiting and budget > 0 and len(rows) < self.max_num_seqs
               and len(running) < self.max_num_seqs):
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while its last token was in flight: wait until it is read back
                break
            cache_seq, hit, taken = self._attach(seq)
            n = min(seq.num_tokens - hit, budget)
            need = self.cache.tables.blocks_needed({cache_seq: n}) + taken
            if need > free or (running and free - need < self.watermark):
                self._detach(cache_seq, hit)
                break
            self.waiting.pop(0)
            self.last_admission_step = self.num_steps
            seq.cache_seq, seq.status, seq.num_computed = cache_seq, Status.RUNNING, hit
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = hit
            free -= need
            seq.num_computed += n
            reserve[seq.cache_seq] = n
            bisect.insort(running, seq, key=self.key)
            rows.append((seq, n))
            budget -= n
        self.cache.tables.append_slots_many(reserve)  # all or nothing; the counts above make it fit
        for seq, _ in rows:  # the engine's forward writes these slots: tell the cache (prefix caching reads it)
            self.cache.mark_computed(seq.cache_seq, seq.num_computed)

        batch = ScheduledBatch(preempted=preempted)
        for seq, n in sorted(rows, key=lambda r: r[1] > 1):  # stable: one-token rows first, order kept
            batch.seqs.append(seq)
            batch.num_new.append(n)
            batch.samples.append(seq.num_computed == seq.num_tokens)
        batch.num_decode = sum(1 for n in batch.num_new if n == 1)
        return batch

    def _admission_open(self, rows: list[tuple[Sequence, int]]) -> bool:
        """May waiting requests join this step? Always, unless deferring (see the module docstring). Asked
        once per step, before admissions: an admitted prompt makes the step eager, so the answer holds."""
        if not self.defer_admission or not self.running or any(n > 1 for _, n in rows):
            return True
        return (self.max_num_seqs - len(self.running) >= max(1, self.max_num_seqs // 8)
                or self.num_steps - self.last_admission_step > MAX_DEFER_STEPS)

    def _attach(self, seq: Sequence) -> tuple[int, int, int]:
        """A cache sequence for `seq`: (its id, tokens found in the prefix cache, evictable blocks it took)."""
        if self.cache.prefix_cache is None:
            return self.cache.add_sequence(), 0, 0
        before = self.cache.num_free_blocks
        cache_seq = self.cache.add_sequence(seq.token_ids)
        return cache_seq, self.cache.num_tokens(cache_seq), before - self.cache.num_free_blocks

    def _detach(self, cache_seq: int, hit: int) -> None:
        """Undo `_attach` of a request that does not fit after all (it stays waiting)."""
        self.cache.free(cache_seq)
        self.cache.prefix_hit_tokens -= hit

    def _release(self, seq: Sequence) -> int:
        """Give the sequence's blocks back (its computed tokens stay in the prefix cache, if any); returns
        how many blocks became free."""
        if self.on_release is not None:
            self.on_release(seq)
        before = self.cache.num_free_blocks
        self.cache.free(seq.cache_seq, seq.token_ids if self.cache.prefix_cache is not None else None)
        seq.cache_seq = None
        return self.cache.num_free_blocks - before

    def preempt(self, seq: Sequence) -> int:
        """Free the sequence's blocks and queue it again; it is recomputed from its tokens when re-admitted.
        Returns how many blocks went back to the pool."""
        freed = self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.add(seq)
        return freed

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out for good (finished or aborted); its blocks go back to the pool at once."""
        if seq.cache_seq is not None:
            self._release(seq)
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
