"""Speculative decoding in the engine (lesson 05's batched path): propose, verify in one forward, accept.

A speculative step runs over the running sequences whose prompts are done (each holds K/V for every token
but its newest). Before it, every row needs room for k + 1 more slots (its newest token and k drafts);
when the pool is short, the lowest-priority sequences are preempted like in the scheduler. A draft model
keeps its own pool of as many blocks, never shared (the target's may be, with prefix caching), so it is
checked too. After it, the
target cache is cut back to each row's kept tokens and the engine appends 1 to k + 1 tokens per row.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from ..paged import PagedKVCache
from ..speculative.batched import BatchedSpeculator, DraftModelProposer
from ..speculative.ngram import NGramSpeculator
from .scheduler import Scheduler
from .sequence import Sequence


class Speculation:
    def __init__(self, target: Transformer, options: dict) -> None:
        self.proposer: DraftModelProposer | None = None
        self.k = int(options.get("num_speculative_tokens", 5))
        if options["method"] == "ngram":
            draft = NGramSpeculator()
        else:
            draft = options["model"]
            if not isinstance(draft, Transformer):
                from ..loading import load_model

                draft, _ = load_model(draft, device=target.device, dtype=target.dtype, tokenizer=False)
            if draft.config.vocab_size != target.config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) is not the target's "
                                 f"({target.config.vocab_size})")
        self.speculator = BatchedSpeculator(target, draft, self.k)
        self.draft = draft
        self.generator = torch.Generator(device=target.device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))))

    def reserve(self, scheduler: Scheduler, max_num_batched_tokens: int) -> list[Sequence]:
        """The rows of the next speculative step, with k + 1 free slots each (preempting if needed)."""
        cache, running = scheduler.cache, scheduler.running
        if self.proposer is None and isinstance(self.draft, Transformer):
            self.proposer = self.speculator.proposer = DraftModelProposer(
                self.draft, num_blocks=cache.num_blocks, block_size=cache.block_size)
        cap = min(scheduler.max_num_seqs, max(1, max_num_batched_tokens // (self.k + 1)))
        while running:
            rows = running[:cap]
            if cache.can_append({s.cache_seq: self.k + 1 for s in rows}) and self._draft_fits(rows):
                return rows
            scheduler.preempt(running[-1])
        return []

    def _draft_fits(self, rows: list[Sequence]) -> bool:
        """Whether the draft's pool holds every row's tokens and k - 1 drafts (what it may hold after)."""
        if self.proposer is None:
            return True
        c, bs = self.proposer.cache, self.proposer.cache.block_size
        keys = {s.cache_seq for s in rows}
        others = sum(len(c.block_table(sid)) for key, (sid, _) in self.proposer._held.items() if key not in keys)
        return sum(-(-(len(s.token_ids) + self.k) // bs) for s in rows) + others <= c.num_blocks

    def step(self, cache: PagedKVCache, rows: list[Sequence]) -> list[list[int]]:
        """Each row's new tokens (its accepted drafts and one token of the target's)."""
        params = [s.params for s in rows]
        return self.speculator.step(
            cache, [s.cache_seq for s in rows], [s.token_ids for s in rows],
            temperature=[p.temperature for p in params], top_k=[None if p.top_k == -1 else p.top_k for p in params],
            top_p=[None if p.top_p == 1 else p.top_p for p in params], generator=self.generator)

    def free(self, cache_seq: int) -> None:
        self.speculator.free(cache_seq)
